"""nnmark.scan on Ray (``ray=``, ``--ray``): on a local Ray instance, the rows are those of
a local scan; a worker that dies is retried; a file that keeps failing gets its own row;
resuming works; keys travel as paths only."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

import nnmark
from nnmark import scan as scan_fn
from nnmark.scan import ray_backend as scan_ray
from nnmark._reference import torch_projection_matrix
from nnmark.cli import main
from nnmark.ledger import TIMING_FIELDS, Ledger

CARRIER = "conv.weight"
SHAPE = (8, 16, 3, 3)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS and k != "skipped"} for r in rows]


def _ledger_rows(path):
    with Ledger(path) as led:
        return _strip(led.rows())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of checkpoints in several formats, marked and not, and some bad files;
    two key files."""
    root = tmp_path_factory.mktemp("raycorpus")
    keys = tmp_path_factory.mktemp("raykeys")
    key = nnmark.WhiteBoxKey.generate(carrier=CARRIER, bits=64, shape=SHAPE)
    key2 = nnmark.WhiteBoxKey.generate(carrier="fc.weight", bits=32, reduction="flat")
    key.save(keys / "a.key")
    key2.save(keys / "b.key")
    # A marked carrier without training: every filter equal to v, the least-norm v with
    # X.v = the owner's bits as +-1.
    x = torch_projection_matrix(key.subkey(), 64, 0, SHAPE[1] * SHAPE[2] * SHAPE[3], dtype=torch.float64)
    v = torch.linalg.lstsq(x, 2.0 * key.bits.double() - 1.0, driver="gelsd").solution
    marked = v.float().reshape(1, *SHAPE[1:]).expand(SHAPE).contiguous()
    assert nnmark.verify(key, marked).ber == 0
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        w = marked + 0.01 * torch.randn(SHAPE, generator=g) if i % 2 else torch.randn(SHAPE, generator=g)
        sd = {CARRIER: w, "fc.weight": torch.randn(10, 8, generator=g)}
        if i % 3 == 0:
            torch.save(sd, root / f"m{i:02d}.pt")
        else:
            save_file(sd, str(root / f"m{i:02d}.safetensors"))
    (root / "sub").mkdir()
    save_file({"fc.weight": torch.randn(10, 8, generator=g)}, str(root / "sub" / "no_carrier.safetensors"))
    (root / "sub" / "junk.bin").write_bytes(b"not a checkpoint" * 10)
    (root / "sub" / "empty.pt").write_bytes(b"")
    return root, [str(keys / "a.key"), str(keys / "b.key")], (key, key2)


def test_ray_scan_equals_local_scan_and_resumes(ray_local, corpus, tmp_path):
    root, key_files, keys = corpus
    local = scan_fn(list(keys), [str(root)], ledger=tmp_path / "local.sqlite", progress=False)
    on_ray = scan_fn(key_files, [str(root)], ledger=tmp_path / "ray.sqlite", progress=False, ray="auto",
                     batch_size=4)  # several tasks, finishing in any order
    assert local.summary["files"] == on_ray.summary["files"] == 15
    assert _strip(on_ray.rows) == _strip(local.rows)  # the same rows, in scan order
    assert _ledger_rows(tmp_path / "ray.sqlite") == _ledger_rows(tmp_path / "local.sqlite")
    assert on_ray.summary["verified"] == local.summary["verified"] == 6
    assert on_ray.exit_code == local.exit_code == 2  # the bad files
    # resuming: a ledger that has part of the files gets only the rest, on Ray
    partial = tmp_path / "partial.sqlite"
    scan_fn(list(keys), [str(root / "sub")], ledger=partial, progress=False)
    again = scan_fn(key_files, [str(root)], ledger=partial, progress=False, ray="auto", batch_size=5)
    assert again.summary["skipped"] == 3 and again.summary["scanned"] == 12
    assert _ledger_rows(partial) == _ledger_rows(tmp_path / "local.sqlite")
    assert _strip(again.rows) == _strip(local.rows)


def test_a_dead_worker_is_retried(ray_local, corpus, tmp_path, monkeypatch):
    root, key_files, keys = corpus
    flag = tmp_path / "died-once"
    victim = str(root / "m05.safetensors")
    real = scan_ray._ray_scan_task

    def dies_once(targets, *args):  # nested: Ray ships it by value to the workers
        if victim in targets and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)  # the worker process dies mid-task, as on a crash or an OOM kill
        return real(targets, *args)

    monkeypatch.setattr(scan_ray, "_ray_scan_task", dies_once)
    res = scan_fn(key_files, [str(root)], progress=False, ray="auto", batch_size=4)
    assert flag.exists()  # the worker did die
    local = scan_fn(list(keys), [str(root)], progress=False)
    assert _strip(res.rows) == _strip(local.rows)  # the retry delivered every row


def test_a_file_that_keeps_failing_gets_its_own_row(ray_local, corpus, tmp_path, monkeypatch):
    root, key_files, keys = corpus
    victim = str(root / "m07.safetensors")
    real = scan_ray._ray_scan_task

    def fails(targets, *args):
        if victim in targets:
            raise RuntimeError("reader bug on this file")  # not a retried exception
        return real(targets, *args)

    monkeypatch.setattr(scan_ray, "_ray_scan_task", fails)
    led = tmp_path / "l.sqlite"
    res = scan_fn(key_files, [str(root)], ledger=led, progress=False, ray="auto", batch_size=8)
    local = scan_fn(list(keys), [str(root)], progress=False)
    bad = [r for r in res.rows if r["path"] == victim]
    assert [(r["status"], r["error_class"]) for r in bad] == [("io_error", "RuntimeError")] * 2
    assert "reader bug on this file" in bad[0]["error_message"]
    # its batch-mates were split off and checked: every other row as a local scan has it
    assert _strip([r for r in res.rows if r["path"] != victim]) == _strip([r for r in local.rows
                                                                           if r["path"] != victim])
    # io_error rows are tried again by the next scan; the other files are skipped
    monkeypatch.setattr(scan_ray, "_ray_scan_task", real)
    again = scan_fn(key_files, [str(root)], ledger=led, progress=False, ray="auto")
    assert again.summary["scanned"] == 1 and again.summary["skipped"] == 14
    assert _ledger_rows(led) == _strip(sorted(local.rows, key=lambda r: (r["path"], r["key_id"])))


def test_a_worker_with_another_key_stops_the_scan(ray_local, corpus, monkeypatch):
    root, key_files, _ = corpus
    real = scan_ray._ray_scan_task

    def other_key(targets, known, key_files, key_ids, *rest):  # as if the worker's file differed
        return real(targets, known, key_files, ["0" * 16] * len(key_ids), *rest)

    monkeypatch.setattr(scan_ray, "_ray_scan_task", other_key)
    with pytest.raises(ValueError, match="must see the same key files"):
        scan_fn(key_files, [str(root)], progress=False, ray="auto")


def test_cli_scan_on_ray(ray_local, corpus, tmp_path, capsys):
    root, key_files, keys = corpus
    led = tmp_path / "cli.sqlite"
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--key", key_files[0], "--key", key_files[1], "--ledger", str(led), "--ray", "auto",
              "--no-progress", "--json", str(root)])
    out = capsys.readouterr().out
    assert exc.value.code == 2  # the bad files
    objs = [json.loads(line) for line in out.splitlines()]
    assert len(objs) == 2 * 15 and len({o["path"] for o in objs}) == 15  # one object per (file, key)
    local = scan_fn(list(keys), [str(root)], progress=False)
    assert _ledger_rows(led) == _strip(sorted(local.rows, key=lambda r: (r["path"], r["key_id"])))


def test_keys_travel_as_paths_only(corpus):
    pytest.importorskip("ray")
    root, key_files, keys = corpus
    with pytest.raises(TypeError, match="key file paths"):
        scan_fn(list(keys), [str(root)], progress=False, ray="auto")
    with pytest.raises(ValueError, match="does not exist"):
        scan_fn([key_files[0] + ".missing"], [str(root)], progress=False, ray="auto")
    with pytest.raises(TypeError, match="cluster address"):
        scan_fn(key_files, [str(root)], progress=False, ray=1)


def test_without_ray_installed_the_error_says_how_to_get_it(corpus, monkeypatch, capsys, tmp_path):
    root, key_files, _ = corpus
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "nnmark\[ray\]"'):
        scan_fn(key_files, [str(root)], progress=False, ray="auto")
    with pytest.raises(SystemExit) as exc:
        main(["scan", "--key", key_files[0], "--ledger", str(tmp_path / "l.sqlite"), "--ray", "auto",
              "--no-progress", str(root)])
    assert exc.value.code == 2 and 'pip install "nnmark[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "l.sqlite").exists()  # stopped before anything was opened


def test_a_cluster_where_no_task_runs_stops_the_scan(ray_local, corpus, monkeypatch):
    root, key_files, _ = corpus

    def always_fails(*args):
        raise RuntimeError("this worker is broken")

    monkeypatch.setattr(scan_ray, "_ray_scan_task", always_fails)
    with pytest.raises(RuntimeError, match="none succeeded"):  # not split into 15 one-file tasks
        scan_fn(key_files, [str(root)], progress=False, ray="auto", batch_size=4)


def _recording_task(log_dir):
    """A task that notes the GPUs Ray gave it and the device it was asked for, then runs
    the real task on the CPU (this machine may have no CUDA)."""
    real = scan_ray._ray_scan_task

    def recording(targets, known, key_files, key_ids, alpha, arch, device, *rest):
        import ray

        with open(os.path.join(log_dir, f"{os.getpid()}-{len(os.listdir(log_dir))}.json"), "w") as f:
            json.dump({"gpus": [str(g) for g in ray.get_gpu_ids()], "device": device}, f)
        return real(targets, known, key_files, key_ids, alpha, arch, None, *rest)

    return recording


def _task_log(log_dir):
    return [json.loads(p.read_text()) for p in log_dir.iterdir()]


def test_cuda_scans_take_one_gpu_per_task(ray_local, corpus, tmp_path, monkeypatch):
    root, key_files, keys = corpus
    log_dir = tmp_path / "tasks"
    log_dir.mkdir()
    monkeypatch.setattr(scan_ray, "_ray_scan_task", _recording_task(str(log_dir)))
    res = scan_fn(key_files, [str(root)], progress=False, ray="auto", device="cuda", batch_size=5)
    log = _task_log(log_dir)
    assert len(log) == 3  # 15 files, 5 per task
    assert all(len(t["gpus"]) == 1 and t["device"] == "cuda" for t in log)
    assert _strip(res.rows) == _strip(scan_fn(list(keys), [str(root)], progress=False).rows)


def test_white_box_scans_stay_on_cpus_on_a_gpu_cluster(ray_local, corpus, tmp_path, monkeypatch):
    root, key_files, _ = corpus
    log_dir = tmp_path / "tasks"
    log_dir.mkdir()
    monkeypatch.setattr(scan_ray, "_ray_scan_task", _recording_task(str(log_dir)))
    scan_fn(key_files, [str(root)], progress=False, ray="auto", batch_size=5)
    log = _task_log(log_dir)
    assert len(log) == 3 and all(t["gpus"] == [] and t["device"] is None for t in log)


def test_cuda_on_a_cluster_without_gpus_is_refused(ray_local, corpus, monkeypatch):
    root, key_files, _ = corpus
    real = ray_local.cluster_resources
    monkeypatch.setattr(ray_local, "cluster_resources", lambda: {k: v for k, v in real().items() if k != "GPU"})
    with pytest.raises(ValueError, match="no GPUs"):
        scan_fn(key_files, [str(root)], progress=False, ray="auto", device="cuda")


def test_a_calibrated_scan_on_ray_equals_the_local_one(ray_local, corpus, tmp_path):
    """Calibrations are not secret: they travel to the tasks, and the rows name the same null."""
    root, key_files, keys = corpus
    nulls = [{CARRIER: torch.randn(SHAPE, generator=torch.Generator().manual_seed(s))} for s in range(12)]
    cal = nnmark.calibrate(keys[0], nulls)
    local = scan_fn(list(keys), [str(root)], progress=False, calibration=cal)
    on_ray = scan_fn(key_files, [str(root)], progress=False, ray="auto", batch_size=4, calibration=cal)
    assert _strip(on_ray.rows) == _strip(local.rows)
    nulls_of = {r["key_id"]: r["null"] for r in local.rows}
    assert nulls_of[keys[0].key_id] == cal.describe() and nulls_of[keys[1].key_id] == "binomial(p0=0.5)"
