"""Stopping a training run with signals: the whole process group (SLURM, ``kill -- -PGID``, Ctrl-C) with loader
workers, and the pieces that make it safe (issue 14)."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from priorclip.checkpoint import read_checkpoint
from priorclip.training.common import TrainingInterrupted, ignore_stop_signals, stop_signals_blocked
from priorclip.training.trainer import TrainData, Trainer
from tests.training.conftest import train_config

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")


def _train_cmd(tiny_data, out, *extra):
    json_path, img_dir = tiny_data
    # 80 pairs / batch 8 = 10 steps an epoch; 50 epochs so the run cannot end before the signal lands.
    # --cache no: the workers decode, so they are busy when the signal comes.
    return [sys.executable, "-m", "priorclip.cli", "train", "--data", str(json_path), "--images", str(img_dir),
            "--model", "clip-tiny", "--epochs", "50", "--batch-size", "8", "--workers", "2", "--cache", "no",
            "--warmup", "2", "--lr", "1e-3", "--no-progress", "--val-split", "none", "--test-split", "none",
            "--no-epoch-checkpoints", "--log-every", "1", "--out", str(out), *extra]


def _cfg(tiny_data, tmp_path, **kw):
    return train_config(tiny_data, tmp_path / "run", **kw)


def _train_losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["type"] == "train"]


def _wait_for_lines(p, path, n, timeout=300.0):
    """Poll for the n-th metrics line (a fixed sleep would be flaky on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            pytest.fail(f"training ended before it was signalled: {p.communicate()[1][-2000:]}")
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"no {n} metrics lines after {timeout} s")


def _sigterm_group_after(cmd, metrics, n_lines):
    """Start ``cmd`` in its own process group, SIGTERM the whole group once ``metrics`` has ``n_lines`` lines, and
    return (process, stderr) after it ended."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_lines(p, metrics, n_lines)
        os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p, err


def test_group_sigterm_with_workers_stops_cleanly_and_resumes_to_the_same_curve(tiny_data, tmp_path):
    """SIGTERM to the process group (workers included) ends the run with one line and a checkpoint at the step it
    reports; resuming gives exactly the losses of an uninterrupted run. Before the fix the workers died of the
    signal and the main process failed mid-step with "DataLoader worker (pid X) is killed by signal"."""
    out = tmp_path / "b"
    p, err = _sigterm_group_after(_train_cmd(tiny_data, out), out / "metrics.jsonl", 2)
    assert p.returncode == 1, err
    assert "Traceback" not in err and "DataLoader worker" not in err, err
    last = err.strip().splitlines()[-1]
    stopped = read_checkpoint(out / "checkpoints" / "latest.pt").extra["train_state"]["step"]
    assert last.startswith(f"Error: stopped by SIGTERM at step {stopped}/500;") and "--resume auto" in last, err
    assert [s for s, _ in _train_losses(out)] == list(range(1, stopped + 1))  # the checkpoint holds every step logged
    # the workers went with the main process: nothing of the group is left
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "loader workers outlived the stopped run"
        time.sleep(0.1)

    # resume in a subprocess; meanwhile run the uninterrupted reference here, on as many threads as the subprocess
    end = stopped + 4
    resumed = subprocess.Popen(_train_cmd(tiny_data, out, "--resume", "auto", "--stop-after", str(end)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads = int(re.search(r"(\d+) threads\)", err).group(1))  # from the run's "[train] ... on CPU (...)" line
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = Trainer(_cfg(tiny_data, tmp_path / "a", epochs=50, cache="no", stop_after=end))
        with pytest.raises(TrainingInterrupted):
            whole.fit()
    finally:
        torch.set_num_threads(old_threads)
    _, resumed_err = resumed.communicate(timeout=300)
    assert resumed.returncode == 1, resumed_err
    assert f"Error: stopped by --stop-after {end} at step {end}/500" in resumed_err, resumed_err
    # Exact: the same samples and augmentation per step (seeded by epoch and index, whatever the workers), the RNG,
    # optimiser and step restored from the checkpoint, deterministic CPU kernels on the same number of threads.
    assert _train_losses(out) == [(i + 1, h["loss"]) for i, h in enumerate(whole.history)]
    assert len(whole.history) == end


class _SignalsItself(torch.utils.data.Dataset):
    """Each item first sends the stop signals to its own (worker) process, as a group signal would."""

    def __init__(self, signals):
        self.signals = signals

    def __len__(self):
        return 4

    def __getitem__(self, i):
        for sig in self.signals:
            os.kill(os.getpid(), sig)
        return i


def _guarded_iter(dataset, batch_size):
    """A loader started as TrainData starts its: under stop_signals_blocked, with the worker guard."""
    guard = functools.partial(ignore_stop_signals, main_pid=os.getpid())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=1, worker_init_fn=guard)
    with stop_signals_blocked():
        return iter(loader)


def test_loader_workers_ignore_stop_signals_from_others():
    it = _guarded_iter(_SignalsItself([signal.SIGTERM, signal.SIGINT]), 2)  # each item signals its worker
    assert [b.tolist() for b in it] == [[0, 1], [2, 3]]
    it = _guarded_iter(_SignalsItself([]), 1)
    assert next(it).tolist() == [0]
    subprocess.run(["kill", "-TERM", str(it._workers[0].pid)], check=True)  # from another process, as the shell
    assert [b.tolist() for b in it] == [[1], [2], [3]]
    # the same loader without either: the worker dies and takes the loop down (what happened in training)
    bare = torch.utils.data.DataLoader(_SignalsItself([signal.SIGTERM]), batch_size=2, num_workers=1)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        list(bare)


def test_a_protected_worker_still_ends_on_its_loaders_own_terminate():
    """Catches: workers deaf to every SIGTERM. The loader's terminate() of a hung worker, and multiprocessing's of
    every worker at exit after a crash, come from the main process; ignored, a crashed run never exited."""
    it = _guarded_iter(_SignalsItself([]), 1)
    assert next(it).tolist() == [0]  # the worker is up, its init has run
    worker = it._workers[0]
    worker.terminate()  # SIGTERM from this (the main) process
    worker.join(20)
    exitcode = worker.exitcode
    del it  # shuts the loader down first: a worker deaf to terminate() would otherwise hold pytest at exit
    assert exitcode == 0  # ended by the guard (torch's own handler also exits 0 for its parent)


def _signal_myself():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # time for a deliverable signal to act


def test_processes_started_while_stop_signals_are_blocked_hold_them_pending():
    """A worker forked in the block cannot be killed by a group signal before its worker_init_fn ignores it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # what DataLoader uses on Linux
    with stop_signals_blocked():
        held = ctx.Process(target=_signal_myself)
        held.start()
    held.join(30)
    assert held.exitcode == 0  # the SIGTERM stayed pending in the child
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the block ended with the context
    bare = ctx.Process(target=_signal_myself)  # started outside the block: killed, so the check above can fail
    bare.start()
    bare.join(30)
    assert bare.exitcode == -signal.SIGTERM


@pytest.mark.parametrize("stop_requested", [True, False])
def test_worker_death_after_a_stop_request_saves_the_last_completed_step(tiny_data, tmp_path, monkeypatch,
                                                                         stop_requested):
    """If a worker dies of the stop signal all the same while the main process waits for a batch, the run stops
    with a checkpoint of the steps it completed; the same error without a stop request is a real failure."""
    real = TrainData.loader

    def loader(self, epoch, start_step):
        it = real(self, epoch, start_step)

        def batches():
            for n, batch in enumerate(it):
                if n == 3:  # the 4th step's batch: 3 steps are done
                    if stop_requested:
                        os.kill(os.getpid(), signal.SIGTERM)
                    raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
                yield batch

        return batches()

    monkeypatch.setattr(TrainData, "loader", loader)
    t = Trainer(_cfg(tiny_data, tmp_path))
    if not stop_requested:
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            t.fit()
        assert not (tmp_path / "run" / "checkpoints" / "latest.pt").exists()
        return
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM at step 3/10;"):
        t.fit()
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt").extra["train_state"]
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    assert len(state["history"]) == 3


def test_a_stop_during_validation_stops_at_that_epochs_end(tiny_data, tmp_path, monkeypatch):
    """Catches: a stop that arrives during an epoch's validation (after its last step was checked) costing the
    start of another epoch: loader workers spun up and a step trained, only to stop after it."""
    real = Trainer.evaluate

    def evaluate_then_signalled(self, dataset):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, dataset)

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_signalled)
    t = Trainer(_cfg(tiny_data, tmp_path, epochs=2, batch_size=40, val_split="val"))  # 2 steps an epoch
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM at step 2/4;"):
        t.fit()
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt").extra["train_state"]
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (2, 1, 0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [v["step"] for v in summary["val"]] == [2]  # the validation finished and is reported


def test_group_sigterm_stops_train_prior_cleanly_with_workers(tiny_data, tmp_path):
    """train-prior's loaders (training and accuracy) get the same worker protection: a group SIGTERM ends the run
    through its normal stop path (evaluate, save prior.pt, exit 0), not a DataLoader worker traceback."""
    json_path, img_dir = tiny_data
    out = tmp_path / "prior"
    cmd = [sys.executable, "-m", "priorclip.cli", "train-prior", "--data", str(json_path), "--images", str(img_dir),
           "--model", "priorclip-tiny", "--epochs", "500", "--batch-size", "8", "--workers", "2", "--warmup", "1",
           "--no-progress", "--test-split", "none", "--out", str(out)]
    p, err = _sigterm_group_after(cmd, out / "metrics.jsonl", 1)
    assert p.returncode == 0 and "Traceback" not in err and "DataLoader worker" not in err, err
    summary = json.loads((out / "prior_summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and summary["steps"] < 500 * 10, summary["steps"]
    assert set(read_checkpoint(out / "prior.pt").state_dict) >= {"res_visual.conv1.weight"}
