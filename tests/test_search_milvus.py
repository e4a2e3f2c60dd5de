"""decd.search.milvus: galleries in Milvus, tested against the real engines: Milvus Lite (embedded) and a Milvus
standalone server started for the session (tests/milvus_fixtures.py). On both: the FLAT collection gives the local
exact index's top-10 (paths and scores), text and photo queries, filters, resuming an interrupted build, added /
changed / deleted files, and a model mismatch refused. Then the errors a user meets, each one line, and what
hostile or careless use meets: rows whose path leaves the gallery, two builds at once, a build of another folder,
filters that would flood the terminal, a long-running service, and a server reached without its password."""

import csv
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from decd.search import (BuildInterrupted, GalleryIndex, GalleryIndexError, IndexNotFoundError, MilvusGallery,
                         MilvusStoreError, StaleIndexError, open_gallery)
from decd.search.milvus import is_milvus_uri
from decd.search.milvus.metadata import read_metadata
from decd.search.milvus.store import default_collection_name, milvus_index, parse_location

from .milvus_fixtures import (FIRST_TIMESTAMP, QUERIES, copy_gallery, milvus_gallery, milvus_server,  # noqa: F401
                              read_metadata_rows, store_uri, write_metadata)

ENGINES = ["lite", "server"]


def _build(workspace, store, gallery=None, metadata="default", **options):
    options.setdefault("batch_size", 4)
    options.setdefault("show_progress", False)
    metadata = workspace["metadata"] if metadata == "default" else metadata
    return MilvusGallery.build(workspace["model"], workspace["processor"], gallery or workspace["gallery"], store,
                               metadata=metadata, model_id=str(workspace["model_dir"]), **options)


def _assert_same_ranking(milvus_result, local_result):
    assert milvus_result.paths == local_result.paths
    np.testing.assert_allclose(milvus_result.scores.numpy(), local_result.scores.numpy(), atol=1e-5)


@pytest.fixture(scope="module", params=ENGINES)
def built(request, milvus_gallery, tmp_path_factory):
    """One FLAT collection with metadata per engine, shared by the tests that only read it."""
    if request.param == "lite":
        store = f"{tmp_path_factory.mktemp('lite') / 'shared.db'}/crops"
    else:
        store = f"{request.getfixturevalue('milvus_server').uri}/crops"
    gallery = _build(milvus_gallery, store)
    return dict(milvus_gallery, store=store, engine=request.param, collection=gallery)


# ---------------------------------------------------------------------------------------------
# Both engines: the same results as the local exact index
# ---------------------------------------------------------------------------------------------


def test_flat_collection_gives_the_local_exact_top10_for_text_and_photo(built):
    model, processor, local = built["model"], built["processor"], built["index"]
    gallery = open_gallery(model, processor, built["store"])  # the stale-model check passes: same model
    assert isinstance(gallery, MilvusGallery) and len(gallery) == len(local) == 12
    assert gallery.backend == "FLAT" and gallery.model_checksum == local.model_checksum
    assert gallery.metadata_fields == {"camera": "str", "timestamp": "int", "score": "float"}
    _assert_same_ranking(gallery.search_text(model, processor, QUERIES, top_k=10),
                         local.search_text(model, processor, QUERIES, top_k=10))
    photo = built["gallery"] / local.paths[5]
    by_photo = gallery.search_image(model, processor, photo, top_k=10)
    _assert_same_ranking(by_photo, local.search_image(model, processor, photo, top_k=10))
    assert by_photo.paths[0][0] == local.paths[5] and by_photo.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    # a key found by a search leads to the image file, like a local index's row
    assert gallery.image_path(int(by_photo.indices[0, 0])) == built["gallery"].resolve() / local.paths[5]
    fresh = MilvusGallery.open(built["store"])  # no search yet: the key is looked up in Milvus
    assert fresh.image_path(int(by_photo.indices[0, 0])) == built["gallery"].resolve() / local.paths[5]


def test_filter_ranks_only_the_matching_images_in_exact_order(built):
    model, processor, local = built["model"], built["processor"], built["index"]
    rows = read_metadata_rows(built["metadata"])
    expression = f'camera == "c2" or (timestamp >= {FIRST_TIMESTAMP + 80} and score < 2.5)'
    matching = {path for path, row in rows.items() if row["camera"] == "c2"
                or (int(row["timestamp"]) >= FIRST_TIMESTAMP + 80 and float(row["score"]) < 2.5)}
    assert 3 < len(matching) < 12
    found = built["collection"].search_text(model, processor, QUERIES, top_k=10, filter=expression)
    exact = local.search_text(model, processor, QUERIES, top_k=12)
    for row in range(len(QUERIES)):
        expected = [(path, score) for path, score in zip(exact.paths[row], exact.scores[row].tolist())
                    if path in matching]
        assert found.paths[row] == [path for path, _ in expected]
        np.testing.assert_allclose(found.scores[row].numpy(), [score for _, score in expected], atol=1e-5)
    by_folder = built["collection"].search_text(model, processor, QUERIES[0], top_k=10, filter='path like "test/%"')
    assert by_folder.paths[0] and all(path.startswith("test/") for path in by_folder.paths[0])
    nothing = built["collection"].search_text(model, processor, QUERIES[0], filter='camera == "nowhere"')
    assert tuple(nothing.indices.shape) == (1, 0)


def test_another_model_is_refused_naming_both(built):
    other = built["other_dir"]
    from inference_decd import load_model

    other_model, other_processor = load_model(other, "cpu")
    with pytest.raises(StaleIndexError) as refused:
        open_gallery(other_model, other_processor, built["store"])
    message = str(refused.value)
    assert str(built["model_dir"]) in message and str(other) in message and "'crops'" in message
    assert "\n" not in message
    with pytest.raises(StaleIndexError, match="--no-resume"):  # a build with it changes nothing
        MilvusGallery.build(other_model, other_processor, built["gallery"], built["store"], show_progress=False,
                            metadata=built["metadata"], model_id=str(other))
    assert MilvusGallery.open(built["store"]).model_checksum == built["index"].model_checksum


def test_a_filter_milvus_rejects_is_one_line_naming_the_fields(built):
    with pytest.raises(MilvusStoreError) as rejected:
        built["collection"].search_text(built["model"], built["processor"], QUERIES[0], filter='camra == "c1"')
    message = str(rejected.value)
    assert "camra" in message and "camera (str), timestamp (int), score (float)" in message and "\n" not in message


@pytest.mark.parametrize("engine", ENGINES)
def test_an_interrupted_build_resumes_and_encodes_only_the_rest(milvus_gallery, engine, request, tmp_path):
    store = store_uri(engine, request, tmp_path)
    with pytest.raises(BuildInterrupted, match="stopped after 1 batches"):
        _build(milvus_gallery, store, max_batches=1)
    first = MilvusGallery.open(store)
    assert len(first) == 4
    kept = first.search(np.eye(1, first.embedding_dim, dtype=np.float32), top_k=4)
    resumed = _build(milvus_gallery, store)
    assert resumed.changes == dict(new=8, changed=0, updated=0, removed=0, unchanged=4)
    assert len(resumed) == 12
    # the rows written before the interruption were kept (same keys), not written again
    again = resumed.search(np.eye(1, resumed.embedding_dim, dtype=np.float32), top_k=12)
    assert set(kept.indices[0].tolist()) <= set(again.indices[0].tolist())
    model, processor = milvus_gallery["model"], milvus_gallery["processor"]
    _assert_same_ranking(resumed.search_text(model, processor, QUERIES, top_k=10),
                         milvus_gallery["index"].search_text(model, processor, QUERIES, top_k=10))
    assert _build(milvus_gallery, store).changes == dict(new=0, changed=0, updated=0, removed=0, unchanged=12)


@pytest.mark.parametrize("engine", ENGINES)
def test_added_changed_deleted_and_relabelled_files_are_brought_up_to_date(milvus_gallery, engine, request, tmp_path):
    gallery = copy_gallery(milvus_gallery["gallery"], tmp_path / "crops")
    paths = list(milvus_gallery["index"].paths)
    store = store_uri(engine, request, tmp_path)
    before = _build(milvus_gallery, store, gallery=gallery)
    keys = {path: int(key) for path, key in zip(*_all_rows(before))}
    removed, changed, relabelled, touched = paths[0], paths[1], paths[2], paths[3]
    (gallery / removed).unlink()
    with Image.open(gallery / changed) as image:  # other pixels under the same name
        image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(gallery / changed)
    added = "extra/new_crop.png"
    (gallery / "extra").mkdir()
    with Image.open(gallery / paths[8]) as image:
        image.rotate(180).save(gallery / added)
    stat = os.stat(gallery / touched)  # the same bytes with another mtime: rewritten, not encoded again
    os.utime(gallery / touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    listed = sorted(set(paths) - {removed} | {added})
    rows = read_metadata_rows(milvus_gallery["metadata"])
    rows[added] = dict(path=added, camera="c1", timestamp=str(FIRST_TIMESTAMP - 1), score="0.5")
    rows[relabelled]["camera"] = "c9"
    metadata = tmp_path / "crops.csv"
    with open(metadata, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "camera", "timestamp", "score"])
        writer.writeheader()
        writer.writerows(rows[path] for path in listed)
    result = before.search(np.eye(1, before.embedding_dim, dtype=np.float32), top_k=12)  # as a local index says
    status = dict(zip(result.paths[0], result.status[0]))
    assert {path for path, value in status.items() if value} == {removed, changed, touched}
    assert (status[removed], status[changed], status[touched]) == ("deleted", "changed", "changed")
    after = _build(milvus_gallery, store, gallery=gallery, metadata=metadata)
    assert after.changes == dict(new=1, changed=1, updated=2, removed=1, unchanged=8)
    assert len(after) == 12
    now = dict(zip(*_all_rows(after)))
    assert sorted(now) == listed
    assert all(now[path] == keys[path] for path in listed if path not in (added, changed, relabelled, touched))
    assert now[changed] != keys[changed] and now[relabelled] != keys[relabelled]
    model, processor = milvus_gallery["model"], milvus_gallery["processor"]
    local = GalleryIndex.build(model, processor, gallery, tmp_path / "index", batch_size=4, show_progress=False)
    _assert_same_ranking(after.search_text(model, processor, QUERIES, top_k=10),
                         local.search_text(model, processor, QUERIES, top_k=10))
    assert after.search_text(model, processor, QUERIES[0], filter='camera == "c9"').paths == [[relabelled]]


def _all_rows(gallery):
    """(paths, keys) of every row of a small collection, through a search (a zero query ranks all of them)."""
    result = gallery.search(np.eye(1, gallery.embedding_dim, dtype=np.float32), top_k=len(gallery))
    return result.paths[0], result.indices[0].tolist()


# ---------------------------------------------------------------------------------------------
# Index types, several processes, replacing a collection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_hnsw_and_ivf_collections_and_reindexing_without_encoding(milvus_gallery, engine, request, tmp_path):
    store = store_uri(engine, request, tmp_path)
    model, processor, local = milvus_gallery["model"], milvus_gallery["processor"], milvus_gallery["index"]
    hnsw = _build(milvus_gallery, store, backend="HNSW16")
    assert (hnsw.backend, hnsw.index_params["M"]) == ("HNSW", 16)
    expected = local.search_text(model, processor, QUERIES, top_k=10)
    _assert_same_ranking(hnsw.search_text(model, processor, QUERIES, top_k=10, ef_search=64), expected)
    ivf = _build(milvus_gallery, store, backend="IVF_FLAT")  # the same rows, indexed again
    assert ivf.backend == "IVF_FLAT" and ivf.changes["unchanged"] == 12 and ivf.changes["new"] == 0
    _assert_same_ranking(ivf.search_text(model, processor, QUERIES, top_k=10, nprobe=1024), expected)
    assert _build(milvus_gallery, store).backend == "IVF_FLAT"  # no --backend: the collection keeps its index
    with pytest.raises(MilvusStoreError, match="its own IVF_FLAT index"):
        ivf.search_text(model, processor, QUERIES[0], backend="exact")
    with pytest.raises(ValueError, match=r"^nprobe must be a positive whole number, got 0"):  # the local index's rule
        ivf.search_text(model, processor, QUERIES[0], nprobe=0)


class _BarrierState:
    """The process state of one thread standing for one process of `accelerate launch`: a real barrier."""

    def __init__(self, rank, world, barrier):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.barrier = barrier

    def wait_for_everyone(self):
        self.barrier.wait(timeout=120)


def test_processes_build_their_shares_into_one_server_collection(milvus_gallery, milvus_server, request, tmp_path):
    store = store_uri("server", request, tmp_path)
    with pytest.raises(BuildInterrupted):
        _build(milvus_gallery, store, max_batches=1)  # 4 rows already there: 8 left, in two shares
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(rank):
        try:
            results[rank] = _build(milvus_gallery, store, batch_size=2, distributed=_BarrierState(rank, 2, barrier))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results[1] is None and results[0].changes["new"] == 4  # the main process's share: half of 8
    model, processor = milvus_gallery["model"], milvus_gallery["processor"]
    gallery = MilvusGallery.open(store)
    assert len(gallery) == 12
    _assert_same_ranking(gallery.search_text(model, processor, QUERIES, top_k=10),
                         milvus_gallery["index"].search_text(model, processor, QUERIES, top_k=10))
    with pytest.raises(MilvusStoreError, match="Milvus Lite .* lets one process"):
        _build(milvus_gallery, f"{tmp_path / 'x.db'}/c", distributed=_BarrierState(0, 2, threading.Barrier(1)))


def test_no_resume_replaces_a_collection_built_by_another_model(milvus_gallery, tmp_path):
    store = f"{tmp_path / 'gallery.db'}/crops"
    _build(milvus_gallery, store)
    from inference_decd import load_model

    other_model, other_processor = load_model(milvus_gallery["other_dir"], "cpu")
    replaced = MilvusGallery.build(other_model, other_processor, milvus_gallery["gallery"], store, resume=False,
                                   show_progress=False, metadata=None)
    assert replaced.changes["new"] == 12 and replaced.metadata_fields == {}
    other_model_gallery = open_gallery(other_model, other_processor, store)  # now that model's
    assert other_model_gallery.model_checksum != milvus_gallery["index"].model_checksum


# ---------------------------------------------------------------------------------------------
# Naming, metadata, index types: checked before anything is written
# ---------------------------------------------------------------------------------------------


def test_store_names_collections_and_default_names(tmp_path):
    assert parse_location("http://10.0.0.5:19530/crops").collection == "crops"
    location = parse_location("https://cloud.example:443/analytics/crops")
    assert (location.uri, location.db_name, location.collection) == ("https://cloud.example:443", "analytics", "crops")
    lite = parse_location(tmp_path / "gallery.db" / "crops")
    assert (lite.uri, lite.collection, lite.lite) == (str(tmp_path / "gallery.db"), "crops", True)
    assert parse_location(tmp_path / "gallery.db", collection="crops").collection == "crops"
    with pytest.raises(MilvusStoreError, match="two collection names"):
        parse_location("http://h:19530/a", collection="b")
    with pytest.raises(MilvusStoreError, match="not a valid Milvus name"):
        parse_location("http://h:19530/my-crops")
    assert default_collection_name(tmp_path / "my-crops") == "my_crops"
    assert default_collection_name(tmp_path / "2024 cam") == "g_2024_cam"
    assert is_milvus_uri("gallery.db") and is_milvus_uri("http://h:19530") and is_milvus_uri(tmp_path / "a.db" / "c")
    assert not is_milvus_uri(tmp_path) and not is_milvus_uri(["a.png"])
    images = tmp_path / "photos.db"  # an existing folder of images that happens to end in .db
    images.mkdir()
    (images / "a.png").write_bytes(b"png")
    assert not is_milvus_uri(images)


def test_index_types_map_from_backend_and_lite_refuses_what_it_lacks():
    assert milvus_index("exact") == ("FLAT", {})
    assert milvus_index("HNSW32") == ("HNSW", {"M": 32, "efConstruction": 200})
    assert milvus_index("IVF4096,Flat") == ("IVF_FLAT", {"nlist": 4096})
    assert milvus_index("IVF1024,PQ64") == ("IVF_PQ", {"nlist": 1024, "m": 64, "nbits": 8})
    assert milvus_index("ivf_sq8") == ("IVF_SQ8", {"nlist": 1024})
    assert milvus_index("DISKANN") == ("DISKANN", {})
    with pytest.raises(MilvusStoreError, match="Milvus Lite has no IVF_PQ index"):
        milvus_index("IVF1024,PQ64", lite=True)
    with pytest.raises(MilvusStoreError, match="sub-quantizer"):
        milvus_index("IVF_PQ")


@pytest.mark.parametrize("states", [["Failed"], ["InProgress", "Failed"]])
def test_a_server_that_fails_to_build_the_index_fails_the_build_naming_its_reason(states):
    """Whether the server reports the failure at once or after a wait, the build says so; never 'built'."""
    from types import SimpleNamespace

    from decd.search.milvus.build import finish_build

    class Collection:  # a server collection whose index build fails: hard to make a real server do on cue
        location, where = SimpleNamespace(lite=False), "collection 'people' on http://127.0.0.1:19530"
        calls: list = []

        def record(self):
            return None, {}

        def set_property(self, what, key, value):
            self.calls.append(key)

        def call(self, what, method, *args, **kwargs):
            self.calls.append(method)

        def index_info(self):
            return {"state": states.pop(0) if len(states) > 1 else states[0], "total_rows": 10,
                    "index_state_fail_reason": "out of disk"}

    target = Collection()
    with pytest.raises(MilvusStoreError, match=r"Milvus failed to build the HNSW index of collection 'people' on "
                                               r"http://127\.0\.0\.1:19530: out of disk"):
        finish_build(target, {"gallery_dir": "g", "updated": "now", "num_files": 1, "model_id": "m"},
                     ("HNSW", {"M": 16}), wrote=True, show_progress=False)
    assert target.calls == ["decd.meta", "flush"]


def test_metadata_is_typed_and_every_image_needs_a_row(milvus_gallery, tmp_path):
    types, values = read_metadata(milvus_gallery["metadata"])
    assert types == {"camera": "str", "timestamp": "int", "score": "float"}
    first = milvus_gallery["index"].paths[0]
    assert values[first] == {"camera": "c1", "timestamp": FIRST_TIMESTAMP, "score": 0.0}
    partial = write_metadata(tmp_path / "partial.csv", milvus_gallery["index"].paths[:10])
    store = tmp_path / "gallery.db"
    with pytest.raises(MilvusStoreError, match="has no row for 2 of the 12 images"):
        _build(milvus_gallery, f"{store}/crops", metadata=partial)
    assert not store.exists()  # refused before the store was created
    bad = tmp_path / "bad.csv"
    bad.write_text("path,id\na.png,1\n")
    with pytest.raises(MilvusStoreError, match="column 'id' that cannot be a field"):
        read_metadata(bad)
    empty_cell = tmp_path / "empty.csv"
    empty_cell.write_text("path,camera\na.png,\n")
    with pytest.raises(MilvusStoreError, match=r"line 2 \(a.png\): column 'camera' is empty"):
        read_metadata(empty_cell)
    with pytest.raises(MilvusStoreError, match="'12.5' is not an integer"):
        read_metadata(write_metadata(tmp_path / "float.csv", ["a.png"], timestamps={"a.png": "12.5"}),
                      {"camera": "str", "timestamp": "int", "score": "float"})


# ---------------------------------------------------------------------------------------------
# The errors a user meets: one line each
# ---------------------------------------------------------------------------------------------


def test_a_server_that_does_not_answer_is_one_line_naming_the_uri(milvus_gallery):
    with __import__("socket").socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(MilvusStoreError) as refused:
        open_gallery(None, None, f"http://127.0.0.1:{port}/crops")
    message = str(refused.value)
    assert f"http://127.0.0.1:{port} does not answer" in message and "tried a gRPC connection" in message
    assert "\n" not in message and time.perf_counter() - started < 30
    with pytest.raises(IndexNotFoundError, match="does not exist; build it with"):
        open_gallery(None, None, milvus_gallery["root"] / "missing.db")
    with pytest.raises(GalleryIndexError, match="not a Milvus store"):
        open_gallery(None, None, milvus_gallery["index"].path, collection="crops")


def test_missing_pymilvus_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'decd\[milvus\]'"):
        open_gallery(None, None, tmp_path / "gallery.db")
    from decd.cli import main

    assert main(["query", f"{tmp_path / 'gallery.db'}/crops", "a man"]) == 1


def test_a_lite_store_held_by_another_process_is_one_line(milvus_gallery, tmp_path):
    store = tmp_path / "held.db"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pymilvus import MilvusClient; "
                               "MilvusClient(sys.argv[1]); print('ready', flush=True); time.sleep(120)", str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for attempt in (lambda: MilvusGallery.open(store),
                        lambda: _build(milvus_gallery, f"{store}/crops")):
            with pytest.raises(MilvusStoreError) as held:
                attempt()
            assert "held by another process" in str(held.value) and str(store) in str(held.value)
            assert "\n" not in str(held.value)
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------
# Under hostile or careless use: rows from elsewhere, two writers, long filters, a long-running service, the server
# ---------------------------------------------------------------------------------------------


def test_a_collection_recording_a_path_outside_its_gallery_is_refused(milvus_gallery, tmp_path, capsys):
    """Rows written into a collection by something else: a path that leaves the gallery folder ('..', absolute) or
    a gallery folder that is not absolute makes the open fail in one line naming the entry, nothing opened; such a
    row written after the open stops the search that returns it."""
    from decd.cli import main
    from decd.search.milvus.store import META_PROPERTY, gallery_row

    store = f"{tmp_path / 'gallery.db'}/crops"
    gallery = _build(milvus_gallery, store, metadata=None)
    vector = np.array(milvus_gallery["index"].embeddings[:1])
    for recorded, message in (("../secret.txt", "goes up out of the gallery folder"),
                              ("/etc/hostname", "is an absolute path")):
        keys = gallery.collection.insert_rows([gallery_row(vector[0], recorded, "0" * 64, "1:1", {})])
        with pytest.raises(MilvusStoreError, match=rf"the row with key {keys[0]} \({re.escape(repr(recorded))}\) "
                                                   rf"{message}.*: nothing was returned; rebuild") as refused:
            gallery.search(vector, top_k=3)  # the new row is the closest to its own vector
        assert "\n" not in str(refused.value)
        with pytest.raises(GalleryIndexError, match=rf"collection 'crops' in .*gallery.db \(its rows' path\): entry "
                                                    rf"12 \({re.escape(repr(recorded))}\) {message}"):
            open_gallery(None, None, store)
        assert main(["query", store, QUERIES[0]]) == 1
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err and captured.out == ""
        gallery.collection.client.delete("crops", ids=keys)
    assert len(open_gallery(None, None, store)) == 12  # whole again
    meta = dict(gallery.meta, gallery_dir="crops")
    gallery.collection.client.alter_collection_properties("crops", properties={META_PROPERTY: json.dumps(meta)})
    with pytest.raises(GalleryIndexError, match=r"records the gallery folder 'crops', which is not an absolute path"):
        MilvusGallery.open(store)


def test_every_filter_is_run_or_refused_in_one_line_showing_it_once(built, capfd):
    """A deeply nested filter and a 126 KB one with a syntax error at its end: each is run or refused in one short
    line that shows the expression once (cut), and no engine traceback reaches the terminal (Milvus Lite's records
    go to its log file, which the message names, and not to the root logger, whose last resort is stderr)."""
    model, processor = built["model"], built["processor"]
    nested = "(" * 200 + 'camera == "c1"' + ")" * 200
    broken = 'camera == "c1" and ' * 6700 + "camera === 1"
    capfd.readouterr()
    reaching_the_root = []  # what a program's handlers, or logging's last resort (stderr), would print
    root = logging.Handler(logging.DEBUG)
    root.emit = reaching_the_root.append
    logging.getLogger().addHandler(root)
    try:
        for expression in (nested, broken):
            message = None
            try:
                result = built["collection"].search_text(model, processor, QUERIES[0], top_k=12, filter=expression)
            except MilvusStoreError as error:
                message = str(error)
                assert "\n" not in message and len(message) < 1500, message[:3000]
            else:
                assert expression is nested and len(result.paths[0]) == 4  # run: the 4 images of camera c1
            terminal = capfd.readouterr()
            assert "Traceback" not in terminal.err + terminal.out and len(terminal.err) < 2000, terminal.err[:3000]
            engine = [record for record in reaching_the_root if record.name.startswith("milvus_lite")]
            assert not engine, engine[0].getMessage()
            if message is not None:
                from decd.search.display import shown_filter
                from decd.search.milvus.store import engine_log

                assert message.count(shown_filter(expression)) == 1 and "camera (str)" in message
                if built["engine"] == "lite":
                    assert f"Milvus Lite's log: {engine_log()}" in message
                    assert "Traceback" in Path(engine_log()).read_text()  # Lite's own record of it is kept there
    finally:
        logging.getLogger().removeHandler(root)


def test_a_gallery_remembers_the_paths_of_recent_results_only(built):
    """A long-running service searches ever more rows: the keys whose path `image_path` remembers stay within
    PATH_CACHE_SIZE, and a forgotten key is looked up again, to the same file."""
    model, processor = built["model"], built["processor"]
    gallery = MilvusGallery.open(built["store"])
    gallery.PATH_CACHE_SIZE = 3
    for path in built["index"].paths:
        gallery.search_image(model, processor, built["gallery"] / path, top_k=12)
        assert len(gallery._paths) <= 3
    result = gallery.search_text(model, processor, QUERIES[0], top_k=12)
    assert [gallery.image_path(key) for key in result.indices[0].tolist()] == \
        [built["gallery"].resolve() / path for path in result.paths[0]]
    assert len(gallery._paths) == 3


def test_one_build_writes_a_server_collection_at_a_time(milvus_gallery, milvus_server, request, tmp_path,
                                                        monkeypatch):
    """Two builds into one server collection at once, of the same folder or of another: the second is refused in
    one line naming the first (its process, host and folder) and writes nothing; the first ends as if alone, and
    its lease goes with it."""
    from decd.search.milvus import build as milvus_build

    store = store_uri("server", request, tmp_path)
    writing, go_on = threading.Event(), threading.Event()
    write = milvus_build._Writer.write

    def held_write(self, batch):  # the first build stops at its first write until the others have tried
        if threading.current_thread().name == "first build":
            writing.set()
            assert go_on.wait(120)
        return write(self, batch)

    monkeypatch.setattr(milvus_build._Writer, "write", held_write)
    results, errors = {}, []

    def first():
        try:
            results["first"] = _build(milvus_gallery, store)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            writing.set()

    thread = threading.Thread(target=first, name="first build")
    thread.start()
    try:
        assert writing.wait(120) and not errors, errors
        other = copy_gallery(milvus_gallery["gallery"], tmp_path / "other")
        holder = rf"pid {os.getpid()} of .* on {re.escape(socket.gethostname())}, gallery " \
                 rf"{re.escape(repr(str(milvus_gallery['gallery'].resolve())))}, started "
        for gallery in (milvus_gallery["gallery"], other):
            with pytest.raises(MilvusStoreError, match=rf"is being written by another build \({holder}") as refused:
                _build(milvus_gallery, store, gallery=gallery)
            assert "\n" not in str(refused.value) and "nothing was changed" in str(refused.value)
    finally:
        go_on.set()
        thread.join(120)
    assert not errors, errors
    built = results["first"]
    assert len(built) == 12 and built.changes["new"] == 12
    from decd.search.milvus.lease import lease_name

    assert lease_name(built.collection.name) not in built.collection.client.list_collections()


def test_a_stale_lease_is_taken_over_and_a_live_one_is_renewed(milvus_gallery, milvus_server, request, tmp_path):
    """The lease of a build that was killed (never renewed) refuses other builds until it expires, then the next
    build takes it over; a running build's lease is renewed past its first expiry."""
    from decd.search.milvus.lease import CollectionLease
    from decd.search.milvus.store import MilvusCollection, connect

    store = store_uri("server", request, tmp_path)
    location = parse_location(store)
    collection = MilvusCollection(connect(location), location, location.collection)
    killed = CollectionLease(collection, "/elsewhere", seconds=3, renew=False).acquire()
    with pytest.raises(MilvusStoreError, match="is being written by another build .*gallery '/elsewhere'"):
        _build(milvus_gallery, store)
    time.sleep(max(0.0, killed.record["expires"] - time.time()) + 0.5)
    with pytest.raises(MilvusStoreError, match="lost its lease .*it expired"):
        killed.check()  # had it still run, it would stop writing now
    assert _build(milvus_gallery, store).changes["new"] == 12  # took the stale lease over
    running = CollectionLease(collection, "/here", seconds=3).acquire()
    try:
        first_expiry = running.record["expires"]
        time.sleep(4)
        running.check()  # renewed every second: still held
        assert running.record["expires"] > first_expiry
        with pytest.raises(MilvusStoreError, match="gallery '/here'"):
            _build(milvus_gallery, store)
    finally:
        running.release()
    assert _build(milvus_gallery, store).changes["unchanged"] == 12


def test_a_build_of_another_folder_is_refused_unless_asked_to_replace(milvus_gallery, tmp_path, capsys):
    """A collection records its gallery folder: a build from another folder is refused (nothing deleted) unless
    --replace (replace=True) makes the collection that folder's; metadata rows naming no image of the folder are
    named, with what to do."""
    from decd.cli import main

    store = f"{tmp_path / 'gallery.db'}/crops"
    _build(milvus_gallery, store).close()
    other = copy_gallery(milvus_gallery["gallery"], tmp_path / "other")
    gone = milvus_gallery["index"].paths[0]
    (other / gone).unlink()
    first = re.escape(repr(str(milvus_gallery["gallery"].resolve())))
    with pytest.raises(MilvusStoreError, match=rf"holds the gallery {first} \(12 rows\), this build is of '.*other'; "
                                               r"nothing was changed: pass --replace"):
        _build(milvus_gallery, store, gallery=other)
    command = ["index", str(other), "--model", str(milvus_gallery["model_dir"]), "--store", store, "--metadata",
               str(milvus_gallery["metadata"]), "--quiet"]
    assert main(command) == 1 and "--replace" in capsys.readouterr().err
    kept = MilvusGallery.open(store)
    assert len(kept) == 12 and kept.gallery_dir == milvus_gallery["gallery"].resolve()
    kept.close()
    from decd.search.milvus.metadata import MetadataRowsWarning

    with pytest.warns(MetadataRowsWarning, match=rf"1 row\(s\) of the metadata file '.*crops.csv' name no image of "
                                                 rf"'.*other' and were not stored: '{re.escape(gone)}'; a row's path"):
        replaced = _build(milvus_gallery, store, gallery=other, replace=True)
    assert len(replaced) == 11 and replaced.gallery_dir == other.resolve()
    assert replaced.changes == dict(new=0, changed=0, updated=0, removed=1, unchanged=11)  # copied: no encoding
    replaced.close()
    assert main(command + ["--replace"]) == 0  # a run of the CLI names the unmatched row too
    captured = capsys.readouterr()
    assert "name no image of" in captured.err and gone in captured.err and "11 unchanged" in captured.out


def test_the_local_server_asks_for_credentials_and_serves_no_http_api(milvus_server):
    """LocalMilvusServer, reached over loopback only: a client without its generated password (none, Milvus's
    built-in one, a wrong one) is refused; the HTTP API Milvus 2.3 serves without credentials on its metrics port is
    off and /expr no longer runs code for the built-in key; etcd listens on 127.0.0.1; the password is on no command
    line and the data folder is its user's only."""
    import stat
    import urllib.error
    import urllib.request

    from decd.search.milvus.store import call_milvus, connect

    location = parse_location(milvus_server.uri)

    def refused(token):
        try:
            call_milvus(location, "listing collections", connect(location, token).list_collections)
        except MilvusStoreError as error:
            return str(error)
        return None

    for token in ("", "root:Milvus", "root:wrong"):
        message = refused(token)
        assert message is not None and "\n" not in message, token
    assert refused(milvus_server.token) is None

    def get(path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{milvus_server.metrics_port()}{path}", timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    assert get("/healthz") == (200, b"OK")
    assert get("/api/v1/collections")[0] == 404 and get("/api/v1/credential/users")[0] == 404
    assert b"output" not in get("/expr?code=1%2B1&auth=by-dev")[1]
    settings = json.loads((milvus_server.data_dir / "decd-server.json").read_text())
    listening = milvus_server.listening()
    etcd = {port: address for address, port in listening
            if port in (settings["etcd_client_port"], settings["etcd_peer_port"])}
    assert etcd == {settings["etcd_client_port"]: "127.0.0.1", settings["etcd_peer_port"]: "127.0.0.1"}
    assert milvus_server.port in {port for _, port in listening}
    password = milvus_server.token.split(":", 1)[1]
    for pid in (milvus_server.process.pid, milvus_server.server_pid()):
        assert password not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    assert stat.S_IMODE(milvus_server.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((milvus_server.data_dir / "decd-server.json").stat().st_mode) == 0o600
