"""Workers that die before a trial's first heartbeat: Optuna never calls a trial without a
heartbeat stale, so before the fix the other workers waited for it forever. On an SQLite
heartbeat storage (the same RDBStorage code as PostgreSQL)."""
import multiprocessing
import os
import signal

import optuna
import pytest

from backproplab.search import study as st


def _spec(tmp_path, heartbeat=1.0):
    return st.StorageSpec(f"sqlite:///{tmp_path / 'study.db'}", heartbeat)


def _die_before_the_heartbeat_thread(spec, name):
    # Optuna's heartbeat thread never gets to write (as when the worker is killed at once)
    optuna.storages._heartbeat.HeartbeatThread.start = lambda self: None
    st.worker_loop(spec, name, _kill_self, "random", 0)


def _kill_self(trial):
    os.kill(os.getpid(), signal.SIGKILL)


def _finish(spec, name, q):
    q.put(st.worker_loop(spec, name, _value, "random", 0))


def _value(trial):
    return 1.0


def test_a_worker_killed_before_its_first_heartbeat_has_its_trial_retried(tmp_path):
    spec = _spec(tmp_path)
    study = st.create_study("g", spec, {"kind": "t", "space": None})
    st.enqueue_points(study, {"a": ({}, {})})
    ctx = multiprocessing.get_context("fork")
    victim = ctx.Process(target=_die_before_the_heartbeat_thread, args=(spec, "g"))
    victim.start()
    victim.join(60)
    assert victim.exitcode == -signal.SIGKILL
    S = optuna.trial.TrialState
    (t,) = study.get_trials(deepcopy=False)
    assert t.state == S.RUNNING and t.user_attrs[st.STARTED] == t.number  # killed inside its objective

    q = ctx.Queue()
    other = ctx.Process(target=_finish, args=(spec, "g", q))
    other.start()
    other.join(60)   # before the fix this worker waited for the dead trial forever
    if other.is_alive():
        other.kill()
    assert other.exitcode == 0, "the surviving worker did not finish: the dead trial never went stale"
    assert q.get(timeout=5) == 1
    states = [(x.state, x.user_attrs["slot"]) for x in study.get_trials(deepcopy=False)]
    assert states == [(S.FAIL, "a"), (S.COMPLETE, "a")]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_taken_but_never_started_is_failed_and_enqueued_again_after_the_grace(tmp_path):  # ask(): a worker's take
    spec = _spec(tmp_path)
    study = st.create_study("g", spec, {"kind": "t", "space": None})
    st.enqueue_points(study, {"a": ({}, {"x": 1}), "b": ({}, {})})
    S = optuna.trial.TrialState
    unstarted = study.ask()                      # RUNNING, as a worker that died right after taking it
    started = study.ask()
    started.set_user_attr(st.STARTED, started.number)
    assert st.fail_unstarted_trials(study, grace=3600) == 0   # too young
    assert st.fail_unstarted_trials(study, grace=0) == 1
    by = {x.number: x for x in study.get_trials(deepcopy=False)}
    assert by[unstarted.number].state == S.FAIL and by[started.number].state == S.RUNNING
    (retry,) = [x for x in by.values() if x.state == S.WAITING]
    assert retry.user_attrs == {"x": 1, "slot": "a"} and retry.system_attrs["failed_trial"] == unstarted.number
    # a retry carries its failed attempt's attributes: their STARTED mark names the old attempt
    retry_running = study.ask()
    assert retry_running.number == retry.number
    study._storage.set_trial_user_attr(retry._trial_id, st.STARTED, unstarted.number)
    assert st.fail_unstarted_trials(study, grace=0) == 1


def _wait_for(pred, timeout=60.0):
    import time
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.1)


def test_a_joined_worker_waits_for_the_later_stages_of_a_kept_open_grid(tmp_path):
    """effects enqueues its pairs when the singles end: a worker that joined from elsewhere
    (wait_open) stays for them while the command's lease is current, and leaves when it ends."""
    import threading
    import time
    spec = st.StorageSpec(str(tmp_path / "grid.journal"))
    study = st.create_study("g", spec, {"kind": "t", "space": None})
    st.enqueue_points(study, {"a": ({}, {})})
    S = optuna.trial.TrialState
    done = lambda slot: st.slot_trials(study).get(slot) is not None and \
        st.slot_trials(study)[slot].state == S.COMPLETE  # noqa: E731
    ran = []
    worker = threading.Thread(target=lambda: ran.append(st.worker_loop(spec, "g", _value, "random", 0,
                                                                       wait_open=True)))
    with st.kept_open(spec, "g", lease=2.0):
        worker.start()
        _wait_for(lambda: done("a"))
        time.sleep(3.0)                  # no point waiting, longer than one lease: renewed, so it stays
        assert worker.is_alive()
        st.enqueue_points(study, {"b": ({}, {})})   # the next stage
        _wait_for(lambda: done("b"))
        assert worker.is_alive()
    worker.join(30)
    assert not worker.is_alive() and ran == [2]
    assert study.user_attrs[st.OPEN_UNTIL] == 0.0
    # the command's own workers never wait; and a lease that lapsed (its command died) keeps no one
    study.set_user_attr(st.OPEN_UNTIL, time.time() + 3600)
    assert st.worker_loop(spec, "g", _value, "random", 0) == 0
    study.set_user_attr(st.OPEN_UNTIL, time.time() - 1)
    t0 = time.time()
    assert st.worker_loop(spec, "g", _value, "random", 0, wait_open=True) == 0
    assert time.time() - t0 < 5
