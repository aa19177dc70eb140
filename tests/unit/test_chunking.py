"""Chunking an input and writing outputs: exact row positions, bounded pieces, every format readable."""
from __future__ import annotations

import io

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import blobs, writers
from shared.ingest import Chunker, chunk_rows_for, narrow_numeric_text, nonempty
from shared.readers import Batch, CsvPiece, RowError
from shared.registry import Feature, ModelVersion


def _batch(rows: list[int], errors: tuple[int, ...] = ()) -> Batch:
    table = pa.table({"x": pa.array([float(r) for r in rows]), blobs.ROW: pa.array(rows, type=pa.int64())})
    return Batch(table, [RowError(r, "malformed_row", f"line {r + 2}") for r in errors])


def _chunk_all(batches, size):
    out = []
    chunker = Chunker(size, lambda i, t, e: out.append((i, t, e)))
    for b in batches:
        chunker.add(b)
    chunker.close()
    return chunker, out


def test_chunks_have_the_asked_size_and_keep_positions():
    """Batches of any size become chunks of exactly chunk_rows rows (the last smaller), positions intact."""
    chunker, out = _chunk_all([_batch(list(range(0, 700))), _batch(list(range(700, 750))),
                               _batch(list(range(750, 2050)))], 500)
    assert [t.num_rows for _, t, _ in out] == [500, 500, 500, 500, 50]
    assert [i for i, _, _ in out] == [0, 1, 2, 3, 4]
    rows = pa.concat_tables([t for _, t, _ in out]).column(blobs.ROW).to_pylist()
    assert rows == list(range(2050))
    assert (chunker.total_rows, chunker.chunks) == (2050, 5)


def test_row_errors_go_to_the_chunk_that_holds_their_position():
    """A malformed row is reported with the chunk whose rows surround it (or the last one), and counted once."""
    first = _batch([0, 1, 2, *range(4, 11)], errors=(3,))
    second = _batch([11, *range(13, 22)], errors=(12, 22))
    chunker, out = _chunk_all([first, second], 10)
    assert [[e.row for e in errs] for _, _, errs in out] == [[3], [12, 22]]
    # Chunk by chunk, rows and errors together are the input's positions in order: downloads stay in input order.
    positions = [p for _, t, errs in out for p in sorted(t.column(blobs.ROW).to_pylist() + [e.row for e in errs])]
    assert positions == list(range(23))
    assert chunker.total_rows == 23


def test_an_input_of_only_malformed_rows_is_one_chunk_of_errors():
    """No good row at all still gives a chunk, so the job accounts for every row."""
    empty = pa.table({blobs.ROW: pa.array([], type=pa.int64())})
    chunker, out = _chunk_all([Batch(empty, [RowError(0, "malformed_row", "m"), RowError(1, "malformed_row", "m")])], 10)
    assert len(out) == 1 and out[0][1].num_rows == 0 and len(out[0][2]) == 2
    assert chunker.total_rows == 2


def test_differently_typed_batches_never_share_a_chunk():
    """A batch whose schema differs starts a new chunk instead of failing to concatenate."""
    a = pa.table({"x": pa.array([1.0, 2.0]), blobs.ROW: pa.array([0, 1], type=pa.int64())})
    b = pa.table({"x": pa.array(["a", "b"]), blobs.ROW: pa.array([2, 3], type=pa.int64())})
    _, out = _chunk_all([Batch(a, []), Batch(b, [])], 10)
    assert [t.column("x").type for _, t, _ in out] == [pa.float64(), pa.string()]


def test_chunk_size_follows_row_width():
    """Wider rows make smaller chunks; an explicit size wins; the cap holds."""
    assert chunk_rows_for(20, None, 0, 2_000_000, 200_000) == 100_000
    assert chunk_rows_for(200, None, 0, 2_000_000, 200_000) == 10_000
    assert chunk_rows_for(2, None, 0, 2_000_000, 200_000) == 200_000
    assert chunk_rows_for(20, 777, 0, 2_000_000, 200_000) == 777
    assert chunk_rows_for(20, None, 5000, 2_000_000, 200_000) == 5000


def test_numeric_text_is_narrowed_only_when_every_cell_parses():
    """CSV text columns become float64 when they parse; a column with a bad cell stays text for validation."""
    mv = ModelVersion(name="m", version="1", path=None, sha256="", estimator=None,
                      features=(Feature("a"), Feature("b")), allows_missing=False, task="regression", classes=None)
    table = pa.table({"a": pa.array(["1.5", None, "2"]), "b": pa.array(["1", "x", "3"])})
    narrowed = narrow_numeric_text(table, mv)
    assert narrowed.column("a").type == pa.float64() and narrowed.column("b").type == pa.string()


def test_blobs_round_trip_with_their_row_errors():
    """A chunk blob gives back the same table and the row errors stored with it."""
    table = pa.table({"x": [1.5, None], blobs.ROW: pa.array([0, 2], type=pa.int64())})
    for compression in ("zstd", "lz4", "none"):
        back, errors = blobs.decode(blobs.encode(table, compression, [RowError(1, "malformed_row", "bad")]))
        assert back.equals(table.replace_schema_metadata(back.schema.metadata))
        assert errors == [(1, "malformed_row", "bad")]


def _results(n: int, start: int = 0) -> pa.Table:
    return pa.table({"row": pa.array(range(start, start + n), type=pa.int64()), "id": [f"r{i}" for i in range(start, start + n)],
                     "prediction": [float(i) / 3 for i in range(start, start + n)]})


EMPTY = pa.schema([("row", pa.int64()), ("id", pa.string()), ("prediction", pa.string())])


def test_writers_stream_one_piece_per_table_and_agree():
    """JSON Lines, CSV and Parquet hold the same rows, and bytes come out table by table."""
    tables = [_results(3), _results(2, 3)]
    expected = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    pieces = list(writers.stream("jsonl", iter(tables), EMPTY))
    assert len(pieces) == 2
    assert pd.DataFrame([orjson.loads(line) for line in b"".join(pieces).splitlines()]).equals(expected)
    csv = b"".join(writers.stream("csv", iter(tables), EMPTY))
    pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(csv)), expected)
    parquet = list(writers.stream("parquet", iter(tables), EMPTY))
    assert len(parquet) >= 3
    pd.testing.assert_frame_equal(pq.read_table(io.BytesIO(b"".join(parquet))).to_pandas(), expected)


def test_writers_give_a_valid_empty_file():
    """No rows: CSV has its header, Parquet is a readable empty file, JSON Lines is empty."""
    assert b"".join(writers.stream("jsonl", iter([]), EMPTY)) == b""
    assert b"".join(writers.stream("csv", iter([]), EMPTY)).decode().strip() == '"row","id","prediction"'
    assert pq.read_table(io.BytesIO(b"".join(writers.stream("parquet", iter([]), EMPTY)))).num_rows == 0


def test_background_emitter_keeps_order_and_raises_the_first_error():
    """Chunks are emitted in order off the caller's thread; a failure reaches the caller."""
    from shared.ingest import BackgroundEmitter

    seen = []
    emitter = BackgroundEmitter(lambda i, t, e: seen.append(i))
    for i in range(20):
        emitter(i, pa.table({"x": [i]}), [])
    emitter.close()
    assert seen == list(range(20))

    def failing(i, t, e):
        if i == 3:
            raise RuntimeError("store down")

    emitter = BackgroundEmitter(failing)
    with pytest.raises(RuntimeError, match="store down"):
        for i in range(50):
            emitter(i, pa.table({"x": [i]}), [])
        emitter.close()
    emitter.abandon()


def test_compression_stays_on_while_it_pays_and_stops_when_it_does_not():
    """The first chunk decides: text that shrinks keeps the codec, binary floats turn it off for the job."""
    import numpy as np

    kept = blobs.Compression("zstd")
    kept.observe(1000, 400)
    kept.observe(1000, 990)  # only the first chunk decides
    assert kept.codec == "zstd"
    dropped = blobs.Compression("zstd")
    dropped.observe(1000, 900)
    assert dropped.codec is None
    floats_of_six_digits = blobs.Compression("zstd")
    floats_of_six_digits.observe(1000, 690)
    assert floats_of_six_digits.codec is None
    assert blobs.Compression("none").codec is None

    floats = pa.table({"x": np.random.default_rng(0).standard_normal(25_000)})
    compressed = blobs.encode(floats, "zstd")
    assert len(compressed) > 0.8 * floats.nbytes  # what makes a float chunk not worth compressing
    repeated = pa.table({"x": np.zeros(25_000)})
    assert len(blobs.encode(repeated, "zstd")) < 0.1 * repeated.nbytes


def test_a_job_of_random_floats_stores_its_chunks_uncompressed_after_the_first(tmp_path, monkeypatch):
    """store_chunks: the codec each chunk is encoded with, for incompressible and for compressible rows."""
    import fakeredis
    import numpy as np

    from shared import ingest
    from shared.jobs import JobOptions, JobStore
    from shared.registry import Registry
    from tests.support import models as test_models

    test_models.install_test_models(tmp_path)
    mv = Registry(tmp_path).get("fussy")
    store = JobStore(fakeredis.FakeRedis(), result_ttl=3600)
    used: list[str | None] = []
    encode = blobs.encode

    def recording(table, compression=None, row_errors=None):
        used.append(compression)
        return encode(table, compression, row_errors)

    monkeypatch.setattr(blobs, "encode", recording)
    names = [f.name for f in mv.features]
    for values, expected in ((lambda rng, n: rng.standard_normal(n), [None] * 3),
                             (lambda rng, n: np.round(rng.standard_normal(n)), ["zstd"] * 3)):
        used.clear()
        rng = np.random.default_rng(1)
        job_id = store.create(model="fussy", version="v1", sha256=mv.sha256, options=JobOptions(), metadata={},
                              source_format="parquet", window=16)
        batches = [Batch(pa.table({**{c: values(rng, 1000) for c in names},
                                   blobs.ROW: pa.array(range(k * 1000, (k + 1) * 1000), type=pa.int64())}), [])
                   for k in range(4)]
        ingest.store_chunks(store, job_id, mv, ingest.nonempty(batches), columns=names, wanted=names, chunk_rows=1000,
                            compression="zstd", send=lambda *_: None)
        assert used == ["zstd"] + expected
        for k in range(4):  # every chunk reads back whatever it was stored with
            table, _ = blobs.decode(store.input_blob(job_id, k))
            assert table.num_rows == 1000


def test_the_first_batch_is_not_kept_once_handed_out():
    """An upload's first CSV piece (megabytes) is freed once stored, not held by the iterator to the end."""
    import weakref

    class Data:  # stands for the piece's bytes, which take no weak references
        pass

    def read():  # as a reader does: nothing kept once yielded
        yield CsvPiece(Data(), 1, 0)
        yield CsvPiece(b"1\n", 1, 1)

    batches = nonempty(read())
    first = next(batches)
    gone = weakref.ref(first.data)
    del first
    assert gone() is None
    assert next(batches).base == 1
