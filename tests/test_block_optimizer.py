"""bench.blocks without training a model: where each block's weights and Adam moments live
(offload parks them on the host), what `materialize` restores, the schedule, `rebase`, the
GradScaler hooks and the checkpoint round trip.  Written against mutation-testing survivors."""

import io

import pytest
import torch

from bench.blocks import BlockLayout, BlockOptimizer, BlockSampler, make_layout


class Stack(torch.nn.Module):
    """A stem, `depth` residual layers (the blocks' layers) and a head: the shape bench's models share."""

    def __init__(self, depth=4, width=3):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Linear(width, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x, layers):
        x = self.stem(x)
        for i in layers:
            x = x + self.layers[i](x)
        return self.head(x).sum()


def make(residency, depth=4, B=2, lr=0.1, warm=lambda step: min(1.0, (step + 1) / 4), dtype=torch.float32):
    model = Stack(depth).to(dtype)
    layout = make_layout(depth, B)
    opt = BlockOptimizer(model, layout, residency, torch.device("cpu"),
                         lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01), warm)
    return model, layout, opt


def block_tensors(model, layout, b):
    return [p for i in layout.layers_of(b) for p in model.layers[i].parameters()]


def train_steps(model, layout, opt, blocks):
    g = torch.Generator().manual_seed(1)
    for b in blocks:
        opt.activate(b)
        opt.zero_grad()
        model(torch.randn(5, 3, generator=g), layout.layers_of(b)).backward()
        opt.step()


def test_offload_parks_every_block_and_activate_brings_back_exactly_one():
    ref = {k: v.clone() for k, v in Stack().state_dict().items()}
    model, layout, opt = make("offload")
    sizes = [sum(ref[f"layers.{i}.{n}"].nbytes for i in layout.layers_of(b) for n in ("weight", "bias")) for b in (0, 1)]
    assert all(p.numel() == 0 for b in (0, 1) for p in block_tensors(model, layout, b))
    assert model.stem.weight.numel() == 9                                   # shared modules never move
    assert opt.parked_bytes() == sum(sizes) and opt.active is None
    assert opt.resident_optimizers() == [opt.optimizers[-1]]
    opt.activate(1)
    assert torch.equal(model.layers[2].weight, ref["layers.2.weight"]) and torch.equal(model.layers[3].bias, ref["layers.3.bias"])
    assert all(p.numel() == 0 for p in block_tensors(model, layout, 0))
    assert opt.parked_bytes() == sizes[0] and opt.active == 1
    assert opt.resident_optimizers() == [opt.optimizers[1], opt.optimizers[-1]]
    opt.activate(0)
    assert all(p.numel() == 0 for p in block_tensors(model, layout, 1))
    assert torch.equal(model.layers[0].weight, ref["layers.0.weight"])
    with pytest.raises(ValueError, match="unknown residency 'host'"):
        make("host")
    assert make("resident")[2].parked_bytes() == 0
    model, layout, opt = make("offload", dtype=torch.float64)           # a parked tensor keeps its dtype
    assert all(p.dtype == torch.float64 for p in model.parameters())
    opt.activate(0)
    assert model.layers[0].weight.dtype == torch.float64 and model.layers[0].weight.shape == (3, 3)


def test_materialize_puts_every_block_on_the_device_and_parks_them_again():
    model, layout, opt = make("offload", depth=3)                       # blocks of 2 and 1 layers: unequal bytes
    train_steps(model, layout, opt, [0, 1, 1, 0])                           # Adam moments exist for both blocks
    parked = opt.parked_bytes()
    with opt.materialize():
        assert all(p.numel() > 0 for p in model.parameters())
    assert opt.active == 0 and opt.parked_bytes() == parked
    moments = sum(v.nbytes for p in opt.block_params[1] for v in opt.optimizers[1].state[p].values())
    weights = sum(p.nbytes for p in Stack(3).layers[2:].parameters())
    assert parked == weights + moments                                  # block 1's weights and all its Adam state
    assert all(p.numel() == 0 for p in block_tensors(model, layout, 1))
    assert all(v.numel() > 1 for p in block_tensors(model, layout, 0) for v in opt.optimizers[0].state[p].values()
               if v.dim() > 0)


def test_offload_updates_are_residents_and_the_schedule_follows_every_step():
    blocks = [0, 1, 1, 0, 1, 0, 0]
    runs = {}
    for residency in ("resident", "offload"):
        model, layout, opt = make(residency)
        train_steps(model, layout, opt, blocks)
        with opt.materialize():
            runs[residency] = {k: v.clone() for k, v in model.state_dict().items()}
        assert opt.lr == pytest.approx(0.1)                                   # warm-up over: lr = peak
        assert all(s.last_epoch == len(blocks) for s in opt.schedulers)
    for k, v in runs["resident"].items():
        assert torch.allclose(v, runs["offload"][k], atol=1e-7), k
    model, layout, opt = make("offload")
    assert opt.lr == pytest.approx(0.1 * 0.25)                                # the schedule's first factor
    train_steps(model, layout, opt, [0])
    assert opt.lr == pytest.approx(0.1 * 0.5) and opt.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.05)


def test_a_block_that_never_stepped_raises_no_scheduler_warning():
    import warnings
    model, layout, opt = make("offload")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # block 1's optimizer has not stepped yet
        train_steps(model, layout, opt, [0, 0])


def test_checkpoint_round_trip_restores_moments_and_refuses_another_residency():
    model, layout, opt = make("offload")
    train_steps(model, layout, opt, [0, 1, 0])
    buffer = io.BytesIO()   # through bytes, as a checkpoint: state_dict() holds the live tensors
    torch.save(opt.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()))
    with opt.materialize():
        weights = {k: v.clone() for k, v in model.state_dict().items()}
    model2, layout2, opt2 = make("offload")
    with opt2.materialize():
        model2.load_state_dict(weights)
    opt2.load_state_dict(state)
    assert opt2.parked_bytes() > 0 and all(p.numel() == 0 for p in block_tensors(model2, layout2, 0))
    assert opt2.schedulers[0].last_epoch == 3
    train_steps(model, layout, opt, [1, 1])
    train_steps(model2, layout2, opt2, [1, 1])
    with opt.materialize(), opt2.materialize():
        for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
            assert torch.equal(a, b), k
    _, _, resident = make("resident")
    with pytest.raises(ValueError, match="residency offload, this run resident"):
        resident.load_state_dict(state)


def test_rebase_sets_the_new_peak_on_the_current_step():
    model, layout, opt = make("offload", warm=lambda step: 0.5 ** step)
    train_steps(model, layout, opt, [0, 1])
    opt.rebase(0.4, 0.2)
    for o in opt.optimizers:
        g = o.param_groups[0]
        assert (g["initial_lr"], g["weight_decay"]) == (0.4, 0.2) and g["lr"] == pytest.approx(0.4 * 0.25)
    assert opt.lr == pytest.approx(0.1) and all(s.base_lrs == [0.4] for s in opt.schedulers)
    train_steps(model, layout, opt, [0])
    assert opt.lr == pytest.approx(0.4 * 0.125)


class FakeScaler:
    def __init__(self):
        self.unscaled, self.stepped, self.updates = [], [], 0

    def unscale_(self, o):
        self.unscaled.append(o)

    def step(self, o):
        self.stepped.append(o)
        o.step()

    def update(self):
        self.updates += 1


def test_scaler_hooks_touch_only_the_resident_optimizers():
    for residency in ("offload", "resident"):
        model, layout, opt = make(residency)
        opt.activate(1)
        model(torch.randn(2, 3), layout.layers_of(1)).backward()
        scaler = FakeScaler()
        opt.unscale(scaler)
        opt.step(scaler)
        expected = [opt.optimizers[1], opt.optimizers[-1]] if residency == "offload" else opt.optimizers
        assert scaler.unscaled == expected and scaler.stepped == expected and scaler.updates == 1
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())


def test_layouts_and_sampler_refuse_what_they_cannot_do():
    assert make_layout(7, 3).layers_per_block == (3, 2, 2)
    assert make_layout(6, 3, [1, 2, 3]).layers_of(2) == range(3, 6)
    assert BlockLayout((2, 2)).all_layers() == range(4) and BlockLayout((2, 3)).depth == 5
    for args, message in [((4, 0), "num_blocks must be >= 1, got 0"), ((2, 3), "larger than the number of layers"),
                          ((6, 2, [2, 2, 2]), "has 3 entries but num_blocks=2"),
                          ((6, 3, [0, 3, 3]), "at least one layer"), ((6, 2, [2, 3]), "sums to 5, not to the depth 6")]:
        with pytest.raises(ValueError, match=message):
            make_layout(*args)
    with pytest.raises(IndexError, match="block 2 out of range for B=2"):
        BlockLayout((1, 1)).layers_of(2)
    with pytest.raises(IndexError):
        BlockLayout((1, 1)).layers_of(-1)
    only = BlockSampler(4, seed=0, allowed=[2, 3])
    state = torch.get_rng_state()
    draws = [only.sample() for _ in range(50)]
    assert set(draws) == {2, 3} and torch.equal(torch.get_rng_state(), state)   # its own generator only
    again = BlockSampler(4, seed=0, allowed=[2, 3])
    assert draws == [again.sample() for _ in range(50)]
    a = BlockSampler(3, seed=5)
    [a.sample() for _ in range(7)]
    b = BlockSampler(3, seed=99)
    b.load_state_dict(a.state_dict())
    assert [a.sample() for _ in range(20)] == [b.sample() for _ in range(20)]
    with pytest.raises(ValueError, match="checkpoint has B=3, this run has B=4"):
        BlockSampler(4, seed=0).load_state_dict(a.state_dict())
