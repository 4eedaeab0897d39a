"""MIL models: every registered model learns on tiny grids; 2DMambaMIL's lattice, switches and its core claim."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from wsi_pipeline.feature_grids import arrangement_bag, tissue_cells
from wsi_pipeline.models import create_model, list_models, survival_from_logits
from wsi_pipeline.models.blocks import LATTICE_TENSORS, build_lattice, place_on_lattice

SMALL = dict(d_model=16, attn_hidden=16, dropout=0.0)
SMALL_BY_MODEL = {"transmil": dict(d_model=16, heads=2, dropout=0.0)}


# Tiny tensors: one torch thread is as fast, and does not spin against other processes on a busy 2-core box.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_model(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, in_dim=8, n_classes=2, **{**SMALL_BY_MODEL.get(name, SMALL), **extra})


def tiny_bags(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        grid = tissue_cells(5, 6, 22, rng) + 7
        feats = rng.normal(0, 1, (len(grid), 8)).astype(np.float32)
        feats[:, 0] += 2.0 if i % 2 else -2.0
        bags.append((torch.from_numpy(feats), torch.from_numpy(grid), torch.tensor([i % 2])))
    return bags


@pytest.mark.parametrize("name", list_models())
def test_prepared_grid_gives_what_the_model_computes_itself(name):
    """`grid_prep` (the host work the data loader's workers do) survives pickling (to the workers and back) and
    gives the model's own output."""
    model = small_model(name).eval()
    feats, grid, _ = tiny_bags()[1]
    if model.grid_prep is None:
        assert name in ("abmil", "transmil")
        return
    prepared = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(model.grid_prep))(grid)))
    with torch.no_grad():
        torch.testing.assert_close(model(feats, grid, prepared).logits, model(feats, grid).logits, rtol=0, atol=0)


def test_registry_lists_every_model_and_rejects_unknown_names():
    assert {"abmil", "transmil", "mambamil", "mambamil_cross4", "mamba2d"} <= set(list_models())
    with pytest.raises(KeyError, match="registered"):
        create_model("nope", in_dim=8, n_classes=2)


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_and_its_loss_falls(name):
    model, bags = small_model(name), tiny_bags()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def epoch() -> float:
        total = 0.0
        for feats, grid, label in bags:
            out = model(feats, grid)
            loss = torch.nn.functional.cross_entropy(out.logits[None], label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        return total / len(bags)

    first = epoch()
    for _ in range(9):
        last = epoch()
    assert last < 0.6 * first, (first, last)
    out = model(*bags[0][:2])
    assert out.attention.shape == (len(bags[0][0]),)
    assert torch.all(out.attention >= 0) and out.attention.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_lattice_is_cropped_to_tissue_and_capped_by_a_stride():
    grid = torch.tensor([[10, 20], [10, 25], [13, 20]])
    lattice = build_lattice(grid, max_cells=1000)
    assert (lattice.height, lattice.width, lattice.stride) == (4, 6, 1)
    assert lattice.cell.tolist() == [0, 5, 18] and int(lattice.occupied.sum()) == 3
    capped = build_lattice(torch.from_numpy(tissue_cells(300, 300, 60_000, np.random.default_rng(0))), 10_000)
    assert capped.height * capped.width <= 10_000 and capped.stride == 3
    assert int(capped.count.sum()) == 60_000


def test_lattice_is_widened_outside_the_box_to_aligned_sides():
    """A 3 x 70 box becomes 3 x 72 (rows the kernels read with 16-byte loads): the new cells are outside the box
    (no pad token, no attention), the box's empty cells are padding, and the rows keep their cells."""
    grid = torch.tensor([[5, 0], [7, 69], [6, 30]])
    lattice = build_lattice(grid, max_cells=1000)
    assert (lattice.height, lattice.width, lattice.merged, lattice.widened) == (3, 72, False, True)
    assert lattice.cell.tolist() == [0, 2 * 72 + 69, 72 + 30]
    inside = torch.zeros(3, 72)
    inside[:, :70] = 1
    assert torch.equal(lattice.inside, inside.flatten())
    empty = lattice.count == 0
    assert torch.equal(lattice.background, (empty & (lattice.inside > 0)).float())
    assert torch.equal(lattice.score_bias == float("-inf"), empty) and lattice.score_bias.max() == 0
    unwidened = build_lattice(grid, max_cells=3 * 71)
    assert (unwidened.width, unwidened.stride, unwidened.widened) == (70, 1, False) and unwidened.inside.min() == 1


@pytest.mark.parametrize("scan_order", ["row_first", "column_first"])
@pytest.mark.parametrize("mask_padding", [True, False], ids=["masked", "unmasked"])
def test_mamba2d_output_does_not_depend_on_the_widening(scan_order, mask_padding):
    """The same slide on its 70 x 75 box widened to 72 x 76 (max_cells allowing it) and not: the same logits and
    attention, two blocks deep (the cells widening adds stay zeros, which the conv sees as its padding, and take no
    attention)."""
    cells = np.concatenate([tissue_cells(70, 75, 1500, np.random.default_rng(3)), [[0, 0], [69, 74]]])
    grid = torch.from_numpy(np.unique(cells, axis=0))  # a 70 x 75 box: corners included
    feats = torch.from_numpy(np.random.default_rng(4).normal(0, 1, (len(grid), 8)).astype(np.float32))
    outs = []
    for max_cells in (100_000, 70 * 75):
        model = small_model("mamba2d", n_layers=2, scan_order=scan_order, mask_padding=mask_padding,
                            max_cells=max_cells).eval()
        assert model.grid_prep(grid).widened == (max_cells == 100_000)
        with torch.no_grad():
            outs.append(model(feats, grid))
    torch.testing.assert_close(outs[0].logits, outs[1].logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].attention, outs[1].attention, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("max_cells", [1000, 12], ids=["one-row-per-cell", "merged"])
def test_place_on_lattice_means_rows_pads_the_rest_and_has_their_gradients(max_cells):
    """Cells hold the mean of their rows and the pad token where they have none; gradcheck of rows and pad (float64),
    on the slide's own lattice and on one coarsened until cells merge rows."""
    grid = torch.from_numpy(tissue_cells(6, 7, 20, np.random.default_rng(1)))
    lattice = build_lattice(grid, max_cells)
    assert lattice.merged == (max_cells == 12)
    h = torch.randn(len(grid), 3, dtype=torch.float64, requires_grad=True)
    pad = torch.randn(3, dtype=torch.float64, requires_grad=True)
    cells = place_on_lattice(h, lattice, pad)
    for c in range(lattice.height * lattice.width):
        rows = h[lattice.cell == c]
        torch.testing.assert_close(cells[c], rows.mean(0) if len(rows) else pad)
    assert torch.autograd.gradcheck(lambda h, pad: place_on_lattice(h, lattice, pad), (h, pad))


def test_empty_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="without patches"):
        build_lattice(torch.zeros(0, 2, dtype=torch.long), max_cells=1000)


def test_packed_tensors_keep_their_values_through_pickling():
    """`Packed` (the grid_prep results' form: one host buffer) gives back each tensor, dtype and shape, after the
    trip to a data loader worker and back."""
    from wsi_pipeline.models.blocks import Packed

    tensors = [torch.arange(6, dtype=torch.int64).view(2, 3), torch.tensor([1.5, -2.0]), torch.arange(3, dtype=torch.int32),
               torch.zeros(0, dtype=torch.int32)]
    packed = pickle.loads(pickle.dumps(Packed(tensors)))
    for got, want in zip(packed.to("cpu"), tensors):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lattice_reaches_the_device_in_one_copy_unchanged():
    """Built on the host (packed), pinned as the trainer's data loader pins it, or built for the device: the same
    tensors on the GPU."""
    grid = torch.from_numpy(tissue_cells(90, 75, 3000, np.random.default_rng(0)))
    host, device = build_lattice(grid, 10_000), build_lattice(grid, 10_000, torch.device("cuda"))
    pinned = host.pin_memory()
    assert pinned.packed.flat.is_pinned() and not host.packed.flat.is_pinned()
    for moved in (device, pinned.to("cuda"), host.to("cuda")):
        for name in LATTICE_TENSORS:
            got = getattr(moved, name)
            assert got.is_cuda and got.dtype == getattr(host, name).dtype
            torch.testing.assert_close(got.cpu(), getattr(host, name))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["mamba2d", "mambamil", "mambamil_cross4"])
def test_pinned_grid_prep_gives_the_models_own_output_on_the_gpu(name):
    model = small_model(name).cuda().eval()
    feats, grid, _ = tiny_bags()[1]
    prepared = model.grid_prep(grid).pin_memory()
    with torch.no_grad():
        torch.testing.assert_close(model(feats.cuda(), grid, prepared).logits, model(feats.cuda(), grid).logits)


def test_mamba2d_caps_huge_lattices_and_keeps_one_weight_per_row():
    model = small_model("mamba2d", max_cells=10)
    feats, grid, _ = tiny_bags(1)[0]
    lattice = model.grid_prep(grid)  # 5 x 6 cells coarsened to at most 10: rows share cells
    assert lattice.stride > 1 and lattice.height * lattice.width <= 10 and lattice.merged
    out = model(feats, grid)
    assert out.attention.shape == (len(feats),)
    assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    shared = lattice.count[lattice.cell] > 1  # rows merged into one cell share its weight equally
    cell_of_shared = lattice.cell[shared]
    first = cell_of_shared[0]
    weights = out.attention[lattice.cell == first]
    assert len(weights) > 1 and torch.allclose(weights, weights[0].expand_as(weights))


def test_column_first_scan_is_the_row_first_scan_of_the_transposed_slide():
    row_first = small_model("mamba2d", d_conv=1).eval()  # a 1x1 conv is symmetric; the scan is not
    with torch.no_grad():  # larger, input-dependent steps: the scan's decay then differs along rows and columns
        row_first.blocks[0].dt_proj.weight.mul_(20)
    column_first = small_model("mamba2d", d_conv=1, scan_order="column_first").eval()
    column_first.load_state_dict(row_first.state_dict())
    feats, grid, _ = tiny_bags(1)[0]
    transposed = grid.flip(1)
    assert torch.allclose(column_first(feats, grid).logits, row_first(feats, transposed).logits, atol=1e-5)
    assert not torch.allclose(row_first(feats, grid).logits, row_first(feats, transposed).logits, atol=1e-5)


def test_padding_switches():
    feats, grid, _ = tiny_bags(1)[0]
    zero = small_model("mamba2d", pad_token="zero")
    assert not zero.pad.requires_grad and torch.count_nonzero(zero.pad) == 0
    masked = small_model("mamba2d").eval()
    unmasked = small_model("mamba2d", mask_padding=False).eval()
    unmasked.load_state_dict(masked.state_dict())
    a, b = masked(feats, grid), unmasked(feats, grid)
    assert not torch.allclose(a.logits, b.logits)  # padding cells took part in the unmasked softmax
    assert b.attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # the pad token fills the background cells the scan and the conv read
        masked.pad.add_(1.0)
    assert not torch.allclose(masked(feats, grid).logits, a.logits)


def test_survival_head():
    hazards, surv, risk = survival_from_logits(torch.tensor([[0.0, 1.0, -1.0]]))
    assert torch.allclose(surv, torch.cumprod(1 - torch.sigmoid(torch.tensor([[0.0, 1.0, -1.0]])), -1))
    assert torch.all(surv[:, 1:] <= surv[:, :-1]) and torch.allclose(risk, -surv.sum(-1))


def _auc_after_training(name: str, seed: int = 0, **extra) -> float:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    data = [(*map(torch.from_numpy, arrangement_bag(i % 2, rng)), i % 2) for i in range(200)]
    train, test = data[:100], data[100:]
    model = create_model(name, in_dim=8, n_classes=2, d_model=16, attn_hidden=16, dropout=0.0, **extra)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = np.random.default_rng(seed)
    for _ in range(5):
        for i in order.permutation(len(train)):
            feats, grid, label = train[i]
            loss = torch.nn.functional.cross_entropy(model(feats, grid).logits[None], torch.tensor([label]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = [torch.softmax(model(f, g).logits, -1)[1].item() for f, g, _ in test]
    return roc_auc_score([label for *_, label in test], scores)


def test_core_claim_2d_arrangement_is_learnt_by_the_2d_scan_not_by_attention_pooling():
    """Both classes hold 8 type-A and 56 type-B tokens; only their 2D layout differs (one solid rectangle vs
    scattered), so a permutation-invariant pooling is at chance by construction."""
    torch.manual_seed(0)
    assert _auc_after_training("mamba2d", d_state=8) >= 0.9
    torch.manual_seed(0)
    assert _auc_after_training("abmil") < 0.65


@pytest.mark.parametrize("scan,shape", [("2d", (3, 70)), ("2d", (4, 8)), ("1d", None)],
                         ids=["2d-3x70", "2d-4x8", "1d-70"])
def test_mamba_block_takes_one_unbatched_sequence(scan, shape):
    """A sequence (L, d) through the block (no batch views) gives the batch of one's output and gradients."""
    from wsi_pipeline.models.blocks import MambaBlock

    torch.manual_seed(0)
    block = MambaBlock(8, scan, d_state=4).double()
    x = torch.randn(1, shape[0] * shape[1] if shape else 70, 8, dtype=torch.float64, requires_grad=True)
    params = list(block.parameters())
    batched = block(x, shape)
    single = block(x[0], shape)
    torch.testing.assert_close(single, batched[0])
    for got, want in zip(torch.autograd.grad(single.square().sum(), [x, *params]),
                         torch.autograd.grad(batched.square().sum(), [x, *params])):
        torch.testing.assert_close(got, want)



@pytest.mark.parametrize("name", ["mamba2d", "mambamil"])
def test_checkpoints_with_the_older_conv_names_still_load(name):
    """Before the mixer became ops.mamba_inner, a block's conv sat one module deeper (`blocks.0.conv.conv.weight`):
    such a state dict loads strictly and gives the same model."""
    model = small_model(name)
    old = {k.replace(".conv.", ".conv.conv."): v for k, v in model.state_dict().items()}
    assert any(".conv.conv." in k for k in old)
    torch.manual_seed(1)  # other initial weights, so the load has something to change
    fresh = create_model(name, in_dim=8, n_classes=2, **SMALL_BY_MODEL.get(name, SMALL))
    assert not torch.equal(fresh.blocks[0].conv.weight if name == "mamba2d" else fresh.layers[0][0].conv.weight,
                           old[next(k for k in old if k.endswith("conv.conv.weight"))])
    fresh.load_state_dict(old)
    for (key, got), want in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, want), key
