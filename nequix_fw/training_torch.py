"""The torch backend of ensemble training: nequix's `NequixTorch` and its torch loss.

Same plans, schedule and outputs as the JAX backend (`training.train_member` calls `fit_torch`):
AdamW with nequix's parameter groups, gradient clipping, linear warm-up then cosine decay,
an exponential moving average of the weights and early stopping on the validation loss.
The starting model (random init, foundation model, predecessor) is nequix's JAX module
converted with nequix's converter, so a seed gives the same initial weights on both backends.
"""

from __future__ import annotations

import copy

import numpy as np
from nequix.data import dict_to_pytorch_geometric

from nequix_fw.epochs import frozen_layers, learning_rate_schedule, run_epochs
from nequix_fw.labels import Labelled
from nequix_fw.settings import TrainingSettings


def _batches(graphs: list, idx: np.ndarray, batch_size: int) -> list:
    from torch_geometric.data import Batch  # noqa: PLC0415

    return [
        Batch.from_data_list([graphs[i] for i in idx[k : k + batch_size]])
        for k in range(0, len(idx), batch_size)
    ]


def fit_torch(
    module,
    config: dict,
    plan,
    graph_dicts: list[dict],
    data: list[Labelled],
    settings: TrainingSettings,
    progress: bool,
):
    """Train `module` (JAX, converted here) on torch; returns (best EMA torch module, best
    epoch, its validation metrics, the per-epoch log rows)."""
    import torch  # noqa: PLC0415
    from nequix.torch_impl.model import get_optimizer_param_groups  # noqa: PLC0415
    from nequix.torch_impl.train import evaluate, loss  # noqa: PLC0415
    from nequix.torch_impl.utils import convert_model_jax_to_torch  # noqa: PLC0415

    torch.manual_seed(plan.seed)
    model = convert_model_jax_to_torch(module, config, False)[0].train()
    k = frozen_layers(settings.freeze, len(model.layers), "the model")
    frozen = tuple(f"layers.{i}." for i in range(k))
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
    ema = copy.deepcopy(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    graphs = [dict_to_pytorch_geometric(g) for g in graph_dicts]
    bs = settings.batch_size
    optim = torch.optim.AdamW(
        get_optimizer_param_groups(model, settings.weight_decay), lr=settings.learning_rate
    )
    schedule = learning_rate_schedule(settings, max(1, -(-len(plan.train_idx) // bs)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda step: float(schedule(step)) / settings.learning_rate
    )
    weights = (settings.energy_weight, settings.force_weight, settings.stress_weight)
    valid_idx = np.array(plan.valid_idx)
    valid_batches = _batches(graphs, valid_idx, bs) if len(valid_idx) else []
    ema_params = dict(ema.named_parameters())

    def step(batch, i: int) -> float:
        optim.zero_grad()
        value, _ = loss(model, batch, *weights, settings.loss_type)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip_norm)
        optim.step()
        sched.step()
        decay = min(settings.ema_decay, (1.0 + i) / (10.0 + i))
        with torch.no_grad():
            for name, pm in model.named_parameters():
                if name in trained:
                    ema_params[name].mul_(decay).add_(pm, alpha=1 - decay)
        return float(value.detach())

    def validate() -> dict | None:
        if not valid_batches:
            return None
        val = dict(evaluate(ema, valid_batches, *weights, settings.loss_type))
        ema.train()
        return val

    return run_epochs(
        plan,
        settings,
        lambda order: _batches(graphs, order, bs),
        step,
        validate,
        lambda: copy.deepcopy(ema).eval(),
        f"member {plan.index} (torch)",
        progress,
    )
