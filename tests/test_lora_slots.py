"""Serving LoRA slots (studio/lora/slots.py, layers in studio/lora/layers.py) on all six families: slot buffers
compute the saved PEFT adapter's function (oracle: the adapter loaded as a named adapter, training's layers, which
tests/test_moe_lora.py ties to plain PEFT), mixed-adapter batches through the engine give the greedy outputs of
per-adapter runs, and resident memory is the base plus one fixed set of slot buffers."""

import gc

import pytest
import torch

from studio.adapters import load_adapter, save_random_adapter, set_active_adapter
from studio.engine import Engine, SamplingParams
from studio.models.loading import QuantSpec, load_base
from studio.models.tiny import EMBEDDED
from studio.registry import AdapterRegistry

# (domain, LoRA targets, rank): expert and attention LoRA, ranks below, at and above the slots' starting rank (8),
# so the buffers grow once while others are resident
ADAPTERS = [("law", "attention,experts", 4), ("code", "experts", 2), ("med", "attention", 12)]
PROMPTS = ["The court held that the contract", "def add(a, b):", "Explain sepsis.", "A patient with"]


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_mixed_batches_equal_per_adapter_runs_and_peft(name, tmp_path):
    maker = load_base(name, QuantSpec("4bit"))
    registry = AdapterRegistry(tmp_path / "reg")
    dirs = {}
    for i, (domain, targets, r) in enumerate(ADAPTERS):
        dirs[domain] = save_random_adapter(maker, tmp_path / domain, domain, seed=i + 1, targets=targets, r=r,
                                           scale=0.1)
        registry.register(dirs[domain], domain)
    ids = torch.randint(6, 2000, (4, 9), generator=torch.Generator().manual_seed(0))
    rows = ["law", None, "med", "code"]
    # the oracle: each saved adapter as a named slot (the layers' trainable form, as training uses them), one at a time
    peft = {}
    with torch.no_grad():
        peft[None] = maker.model(input_ids=ids).logits
        for domain in dirs:
            load_adapter(maker.model, dirs[domain], domain)
            set_active_adapter(maker.model, domain)
            peft[domain] = maker.model(input_ids=ids).logits
            set_active_adapter(maker.model, None)
    del maker
    engine = Engine(name, registry=registry, max_resident=4, max_batch_size=8, max_wait_ms=50)
    try:
        for domain in ["code", "law", "med"]:  # slots 0, 1, 2; the rank grows from 8 to 12 on the last
            engine.load(domain)
        assert engine.residency.slots.rank == 12
        with engine.model_lock, torch.no_grad():
            for domain in dirs:
                with engine.using(domain) as model:
                    uniform = model(input_ids=ids).logits
                assert (uniform - peft[domain]).abs().max() < 1e-4, domain
                assert (peft[domain] - peft[None]).abs().max() > 1e-2, domain  # the adapter does change the output
            slots = engine.residency.slots
            with slots.rows([None if d is None else engine.residency.entries[f"{d}@v1"].slot for d in rows]):
                mixed = engine.model(input_ids=ids).logits
        for i, domain in enumerate(rows):
            assert (mixed[i] - peft[domain][i]).abs().max() < 1e-4, (domain, (mixed[i] - peft[domain][i]).abs().max())
        # greedy generation through the scheduler: one mixed batch against one run per adapter
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        together = engine.generate(PROMPTS, adapters=rows, params=params)
        for prompt, domain, got in zip(PROMPTS, rows, together):
            alone = engine.generate(prompt, adapters=domain, params=params)[0]
            assert got.token_ids == alone.token_ids, domain
            assert got.adapter == (None if domain is None else f"{domain}@v1")
    finally:
        engine.close()


def _tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and id(obj) not in seen:
            seen.add(id(obj))
            total += obj.untyped_storage().nbytes() if obj.device.type == "cpu" else 0
    return total


def test_resident_memory_is_base_plus_one_set_of_slot_buffers(tmp_path):
    """Eight resident adapters of rank 8 on attention and experts: the model holds exactly the base's tensors plus the
    slot buffers, which hold exactly the eight adapters' factors (the bound: base + sum of the adapters); mixing other
    sets of adapters afterwards allocates nothing that stays (live tensors within 1 MiB)."""
    maker = load_base("tiny-moe", QuantSpec("4bit"))
    registry = AdapterRegistry(tmp_path / "reg")
    adapter_bytes = 0
    for i in range(9):
        path = save_random_adapter(maker, tmp_path / f"a{i}", f"a{i}", seed=i, targets="attention,experts", r=8)
        registry.register(path, f"a{i}")
        if i < 8:
            from safetensors.torch import load_file

            adapter_bytes += sum(t.nbytes for t in load_file(str(path / "adapter_model.safetensors")).values())
    del maker
    engine = Engine("tiny-moe", registry=registry, max_resident=8, max_batch_size=8, max_wait_ms=0)

    def model_bytes():
        return sum(t.nbytes for t in list(engine.model.parameters()) + list(engine.model.buffers()))

    try:
        base = model_bytes()
        for i in range(8):
            engine.load(f"a{i}")
        slots = engine.residency.slots
        assert slots.nbytes() == adapter_bytes  # 8 slots at rank 8 in float32: the adapters' own factors
        assert model_bytes() == base + slots.nbytes()
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        sets = [["a0", "a1", None, "a2"], ["a3", "a4", "a5", "a6"], ["a7", None, "a0", "a5"], ["a2", "a6", "a1", "a3"]]
        engine.generate(["x"] * 4, adapters=sets[0], params=params)
        gc.collect()
        settled = _tensor_bytes()
        for adapters in sets[1:]:
            engine.generate(["x"] * 4, adapters=adapters, params=params)
            gc.collect()
            assert _tensor_bytes() - settled < 2 ** 20
        assert model_bytes() == base + slots.nbytes()
        # a ninth adapter takes the LRU idle slot: still one set of buffers
        engine.generate("x", adapters="a8", params=params)
        assert len(engine.resident()) == 8 and model_bytes() == base + slots.nbytes()
    finally:
        engine.close()


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("grid", [True, False])
def test_uniform_expert_lora_equals_the_per_row_reference(layout, grid, monkeypatch):
    """One slot's expert LoRA on every row (the uniform batch's fast path: a grid over all experts, or the hit
    experts' grouped products when routing is skewed) equals B_e (A_e x) computed row by row."""
    from studio.lora import layers
    from studio.moe.grouped import Routing

    monkeypatch.setattr(layers, "_grid_pays", lambda *args: grid)
    g = torch.Generator().manual_seed(0)
    experts, top_k, tokens, fan_in, fan_out, r = 12, 3, 7, 10, 6, 4
    top_k_index = torch.rand(tokens, experts, generator=g).topk(top_k, -1).indices
    top_k_index[:3, 0] = 5  # skew: one expert gets more rows than the others
    routing = Routing(top_k_index, experts, layout)
    assert routing.groups < experts  # some experts are not hit: the grid's zero rows and the gather both matter
    a, b = torch.randn(experts, r, fan_in, generator=g), torch.randn(experts, fan_out, r, generator=g)
    rows = torch.randn(routing.rows, fan_in, generator=g)
    x = routing.to_layout(rows)
    y0 = torch.randn(routing.rows, fan_out, generator=g)
    # the slot layout holds the factors transposed: A^T [E, in, r], B^T [E, r, out]
    a_t, b_t = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()
    y = routing.to_layout(y0) + layers._expert_lora(routing, x, a_t, b_t)
    expert_of_row = routing.hit[routing.group_of_row]
    want = y0 + torch.stack([b[e] @ (a[e] @ rows[i]) for i, e in enumerate(expert_of_row.tolist())])
    assert torch.allclose(routing.from_layout(y), want, atol=1e-5)


@pytest.mark.parametrize("dense", [True, False])
def test_mixed_linear_slots_equal_the_per_row_reference(dense, monkeypatch):
    """A mixed batch through a SlotLinear (few tokens: all used slots as one masked rank; many: tokens sorted by
    slot) equals base(x) + B_s (A_s x) row by row, for slots that do not start at 0 and with a filled slot between
    them that no row uses (its columns must be masked out)."""
    from studio.lora import layers

    monkeypatch.setattr(layers, "DENSE_MIXED_MACS", 2 ** 40 if dense else 0)
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(10, 7)
    batch = layers.LoraBatch(5)
    layer = layers.SlotLinear(base, batch, 5, rank=4, dtype=torch.float32)
    factors = {}
    for slot, r in [(1, 4), (2, 3), (3, 2)]:
        factors[slot] = (torch.randn(r, 10, generator=g), torch.randn(7, r, generator=g))
        layer.write(slot, *factors[slot])
    rows = [3, None, 1, 3, 1, None]
    x = torch.randn(len(rows), 3, 10, generator=g)
    batch.set(rows)
    with torch.no_grad():
        y = layer(x)
        want = base(x)
        for i, s in enumerate(rows):
            if s is not None:
                a, b = factors[s]
                want[i] += x[i] @ a.t() @ b.t()
    batch.clear()
    assert torch.allclose(y, want, atol=1e-5)


@pytest.mark.parametrize("grid", [True, False])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_mixed_expert_slots_equal_uniform_runs_row_by_row(grid, layout, monkeypatch):
    """A mixed batch through a model's ExpertSlots equals, row by row, the uniform forward of that row's slot (and
    the bare base for base rows), for slots 1..3 (not starting at 0), on a grid or on grouped products, with the
    base's rows in either layout (the mixed rows are gathered from it and added back into it)."""
    from studio.lora import layers
    from studio.lora.slots import LoraSlots

    monkeypatch.setattr(layers, "_grid_pays", lambda *args: grid)
    loaded = load_base("tiny-moe", QuantSpec("4bit"))
    lora = LoraSlots(loaded.model, max_slots=4, rank=4)
    path = next(n for n, m in loaded.model.named_modules() if type(m).__name__ == "StudioExperts")
    experts = loaded.model.get_submodule(path)
    experts.grouped_layout = layout
    slots = lora._experts(path)
    g = torch.Generator().manual_seed(0)
    for slot in (1, 2, 3):
        for name in experts.weight_names:
            a, b = slots.lora_A[name][slot], slots.lora_B[name][slot]
            slots.write(slot, name, torch.randn(a.shape, generator=g) * 0.3, torch.randn(b.shape, generator=g) * 0.3)
    tokens = 24
    hidden = torch.randn(tokens, experts.layout(experts.weight_names[0])[1], generator=g)
    top_k_index = torch.rand(tokens, experts.num_experts, generator=g).topk(2, -1).indices
    weights = torch.rand(tokens, 2, generator=g)
    rows = [3, None, 1, 3, 2, None, 1, 1] * 3  # one token per row
    with torch.no_grad():
        with lora.rows(rows):
            mixed = experts(hidden, top_k_index, weights)
        bare = experts(hidden, top_k_index, weights)
        for slot in (None, 1, 2, 3):
            with lora.rows([slot] * tokens):
                alone = experts(hidden, top_k_index, weights)
            mine = [i for i, s in enumerate(rows) if s == slot]
            assert torch.allclose(mixed[mine], alone[mine], atol=1e-5), slot
            assert slot is None or (alone[mine] - bare[mine]).abs().max() > 1e-2  # the slot's LoRA does change them


def test_grid_pays_for_decode_routing_and_not_for_prefills_or_skewed_routing():
    """The cost rule behind `_expert_lora`'s choice (measured with bench/expert_lora_paths.py): a decode step's routing
    (a few rows per expert, jagged) runs on the grid of the hit experts (measured 2-7x faster than the grouped loop at
    64 experts top-8); a 384-token prefill (~62 rows per expert) and a routing with one expert taking most rows run
    the grouped products; in between (~20 rows per expert) the grid with 2 threads, the grouped loop with one; padded
    routing is the grid already."""
    from studio.lora.layers import _grid_pays
    from studio.moe.grouped import Routing

    g = torch.Generator().manual_seed(0)
    experts, r, fan_in, fan_out = 64, 16, 512, 384
    a, b = torch.zeros(experts, r, fan_in), torch.zeros(experts, fan_out, r)

    def routing(tokens):
        return Routing(torch.rand(tokens, experts, generator=g).topk(8, -1).indices, experts, "jagged")

    decode, middle, prefill = routing(12), routing(96), routing(384)
    assert decode.cap <= 8 and 12 < middle.cap < 32 < prefill.cap
    skewed_index = torch.rand(4096, experts, generator=g).topk(8, -1).indices
    skewed_index[:, 0] = 3  # every token's first choice is expert 3: its group holds 4096 rows, the others ~500
    skewed = Routing(skewed_index, experts, "jagged")
    threads = torch.get_num_threads()
    try:
        for n, middle_pays in ((1, False), (2, True)):
            torch.set_num_threads(n)
            assert decode.groups < experts and _grid_pays(decode, a, b)
            assert _grid_pays(middle, a, b) == middle_pays, n
            assert not _grid_pays(prefill, a, b) and not _grid_pays(skewed, a, b)
            assert _grid_pays(Routing(torch.tensor([[1, 2], [2, 1], [1, 2]]), experts, "padded"), a, b)
    finally:
        torch.set_num_threads(threads)


def test_named_slots_and_serving_slots_share_the_layers(tmp_path):
    """One model, one set of LoRA layers: an adapter loaded as a named slot (training's form) and the same files
    written into a serving slot give the same logits, and LoraSlots adds its buffers to the SlotLinear that
    apply_plan made instead of wrapping it again."""
    from studio.lora.experts import ExpertAdapter
    from studio.lora.layers import SlotLinear
    from studio.lora.slots import LoraSlots
    from studio.moe.experts import StudioExperts

    loaded = load_base("tiny-moe", QuantSpec("4bit"))
    adapter = save_random_adapter(loaded, tmp_path / "law", "law", seed=3, targets="attention,experts", r=4)
    plan = load_adapter(loaded.model, adapter, "law")
    ids = torch.randint(6, 2000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        set_active_adapter(loaded.model, "law")
        named = loaded.model(input_ids=ids).logits
        set_active_adapter(loaded.model, None)
        bare = loaded.model(input_ids=ids).logits
    layer = loaded.model.get_submodule(plan.linear_targets[0])
    assert isinstance(layer, SlotLinear) and "law" in layer.lora_A
    experts = loaded.model.get_submodule(next(iter(plan.expert_targets)))
    assert isinstance(experts, StudioExperts) and isinstance(experts.adapters["law"], ExpertAdapter)
    slots = LoraSlots(loaded.model, max_slots=2, rank=4)
    slots.load(1, adapter)
    assert loaded.model.get_submodule(plan.linear_targets[0]) is layer and layer.slot_A.shape[0] == 2
    with torch.no_grad(), slots.rows([1, None]):
        served = loaded.model(input_ids=ids).logits
    assert (named - bare).abs().max() > 1e-2
    assert (served[0] - named[0]).abs().max() < 1e-4 and (served[1] - bare[1]).abs().max() < 1e-4


@pytest.mark.parametrize("buffers,activations", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_expert_slots_in_another_dtype_than_the_activations(buffers, activations):
    """Slot buffers of another dtype than the activations (their hit experts' factors are cast after the gather,
    uniform and mixed batches) give what float32 buffers and activations holding the same values give."""
    from studio.lora.layers import ExpertSlots, LoraBatch

    loaded = load_base("tiny-moe", QuantSpec("4bit"))
    path = next(n for n, m in loaded.model.named_modules() if type(m).__name__ == "StudioExperts")
    experts = loaded.model.get_submodule(path)
    batch = LoraBatch(3)
    slots = {dtype: ExpertSlots(experts, batch, 3, 4, dtype) for dtype in (torch.float32, buffers)}
    g = torch.Generator().manual_seed(0)
    for slot in (1, 2):
        for name in experts.weight_names:
            a, b = slots[torch.float32].lora_A[name][slot], slots[torch.float32].lora_B[name][slot]
            # values that bfloat16 holds exactly: both buffers hold the same factors
            a, b = (torch.randn(t.shape, generator=g).mul(0.3).bfloat16().float() for t in (a, b))
            for s in slots.values():
                s.write(slot, name, a, b)
    tokens = 16
    hidden = torch.randn(tokens, experts.layout(experts.weight_names[0])[1], generator=g)
    top_k_index = torch.rand(tokens, experts.num_experts, generator=g).topk(2, -1).indices
    weights = torch.rand(tokens, 2, generator=g)
    rows = [1, None, 2, 1] * 4  # one token per row
    tol = 1e-5 if activations == torch.float32 else 3e-2

    def run(dtype, row_slots, x_dtype):
        experts.lora_slots = slots[dtype]
        batch.set(row_slots)
        try:
            return experts(hidden.to(x_dtype), top_k_index, weights.to(x_dtype)).float()
        finally:
            batch.clear()

    with torch.no_grad():
        bare = experts(hidden, top_k_index, weights)
        for row_slots in ([1] * tokens, rows):
            want = run(torch.float32, row_slots, torch.float32)
            got = run(buffers, row_slots, activations)
            assert slots[buffers].lora_A[experts.weight_names[0]].dtype == buffers
            assert (want - bare).abs().max() > 0.1  # the slots' LoRA does change the output
            assert (got - want).abs().max() <= tol * want.abs().max(), (row_slots, (got - want).abs().max())
