"""fused_flat.nn.bn: a frozen pass changes no BatchNorm buffer and computes the same outputs."""
import copy

import pytest
import torch

from fused_flat.nn.bn import disable_running_stats, enable_running_stats, running_stats_frozen


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(momentum=0.1):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=momentum),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 5),
                               torch.nn.BatchNorm1d(5))


def _buffers(m):
    return {k: v.clone() for k, v in m.named_buffers()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", ["functions", "context", "global_hook"])
@pytest.mark.parametrize("momentum", [0.1, None])   # None: cumulative average (momentum-0 trick breaks it)
def test_frozen_pass_leaves_buffers_and_outputs(mode, momentum):
    net = _net(momentum)
    x = torch.randn(6, 3, 6, 6)
    net(x)                                   # non-trivial running stats
    before = _buffers(net)
    twin = copy.deepcopy(net)
    want = twin(x)                           # an ordinary training forward
    if mode == "functions":
        disable_running_stats(net)
        got = net(x)
        enable_running_stats(net)
    else:
        with running_stats_frozen(net if mode == "context" else None):
            got = net(x)
    _assert_same(_buffers(net), before)
    assert torch.equal(got, want)            # batch statistics as usual in train mode
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net(x + 1.0)                             # tracking is back on afterwards
    assert int(net[1].num_batches_tracked) == int(before["1.num_batches_tracked"]) + 1
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])


def test_eval_mode_unchanged_and_nesting():
    net = _net()
    x = torch.randn(6, 3, 6, 6)
    net(x)
    net.eval()
    want = net(x)
    with running_stats_frozen(net):
        with running_stats_frozen():
            got = net(x)
        assert not net[1].track_running_stats      # the outer block still holds it
    assert torch.equal(got, want)
    assert net[1].track_running_stats
    disable_running_stats(net)
    with running_stats_frozen(net):
        pass
    assert not net[1].track_running_stats          # disable_running_stats outlives the block
    enable_running_stats(net)
    assert net[1].track_running_stats


def test_exception_restores_tracking():
    net = _net()
    with pytest.raises(ZeroDivisionError):
        with running_stats_frozen():
            net(torch.randn(4, 3, 6, 6))
            1 / 0
    assert net[1].track_running_stats and net[5].track_running_stats


def test_untracked_modules_left_alone_and_bad_input():
    bn = torch.nn.BatchNorm1d(3, track_running_stats=False)
    disable_running_stats(bn)
    enable_running_stats(bn)
    assert not bn.track_running_stats
    with pytest.raises(TypeError, match="torch.nn.Module"):
        disable_running_stats([bn])


def test_global_hook_freezes_only_the_entering_thread():
    """running_stats_frozen(None) in thread A must not freeze a model that runs in thread B
    (here the main thread) at the same time; after A exits, both models update again."""
    import threading

    net_a, net_b = _net(), _net()
    x = torch.randn(6, 3, 6, 6)
    inside, b_done, a_exited = threading.Event(), threading.Event(), threading.Event()
    seen, errors = {}, []

    def thread_a():
        try:
            with running_stats_frozen():
                before = _buffers(net_a)
                net_a(x)
                seen["a_inside"] = (before, _buffers(net_a))
                inside.set()
                if not b_done.wait(timeout=30):
                    raise TimeoutError("thread B never ran")
                net_a(x + 1.0)                       # still frozen after B ran
                seen["a_after_b"] = (before, _buffers(net_a))
        except BaseException as e:                   # reported by the main thread
            errors.append(e)
        finally:
            inside.set()
            a_exited.set()

    t = threading.Thread(target=thread_a, daemon=True)
    t.start()
    try:
        assert inside.wait(timeout=30)
        assert not errors, errors
        before_b = _buffers(net_b)
        net_b.train()
        net_b(x)                                     # thread B, while A is inside the block
        assert net_b[1].track_running_stats
        assert int(net_b[1].num_batches_tracked) == int(before_b["1.num_batches_tracked"]) + 1
        assert not torch.equal(net_b[1].running_mean, before_b["1.running_mean"])
        assert not torch.equal(net_b[5].running_var, before_b["5.running_var"])
    finally:
        b_done.set()
    assert a_exited.wait(timeout=30)
    t.join(timeout=30)
    assert not t.is_alive()
    assert not errors, errors
    for key in ("a_inside", "a_after_b"):
        _assert_same(*seen[key])                     # A's own model stayed frozen throughout
    for net in (net_a, net_b):                       # after exit, both update
        before = _buffers(net)
        net(x * 2.0)
        assert int(net[1].num_batches_tracked) == int(before["1.num_batches_tracked"]) + 1
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])
