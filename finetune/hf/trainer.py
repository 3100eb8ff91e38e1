"""``SlimtuneTrainer``: a ``transformers.Trainer`` whose step is a slimtune engine's."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader, Sampler

from slimtune.optimizers import SEEDED, build_optimizer

from ..batches import input_tokens
from ..chunked_loss import chunked_loss_supported
from ..engine import InMemoryEngine
from ..errors import RecipeError
from ..evaluate import supervised_tokens
from ..step_loss import backward_step, zeroth_order_loss
from ..streaming import StreamBatches
from .engine_optimizer import EngineOptimizer
from .process_group import destroy_process_group_at_exit
from .refusals import FSDP_REFUSED, refuse_under_processes
from .stock import memory_logs


class SeededOrder(Sampler[int]):
    """Example order of one epoch: ``randperm(n)`` seeded by ``seed + epoch`` (``set_epoch``, which the Trainer
    calls), the order ``slimtune train`` uses (:func:`..batches.batches`), so batches of consecutive indices are its
    micro-batches."""

    def __init__(self, n: int, seed: int):  # noqa: D107
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # noqa: D102
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class SlimtuneTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose step is a slimtune engine's.

    Give it either ``engine=`` (built from a recipe by :func:`from_recipe`) or ``optimizer=`` (a name in
    ``slimtune.optimizers.OPTIMIZERS``) with ``optimizer_kwargs`` and ``per_layer``; the optimizer then gets the
    args' ``learning_rate`` and ``weight_decay`` and trains the model's trainable parameters in memory.

    ``args.max_grad_norm`` is applied by the engine (as ``slimtune train`` does; the Trainer's own clipping is
    turned off, and the logged ``grad_norm`` is the engine's). The loss of a micro-batch is slimtune's
    (:func:`.step_loss.micro_batch_loss`: token-weighted over the step's micro-batches, plus MixLoRA's router
    term). ``data_seed`` (default None: the Trainer's sampler) orders the examples as ``slimtune train`` does.
    ``step_losses``: every optimizer step's loss, unrounded (the Trainer's logs round to 4 digits).
    """

    def __init__(self, *args, engine=None, optimizer: str | None = None, optimizer_kwargs: dict | None = None,
                 per_layer: bool = False, data_seed: int | None = None, chunked_loss: bool = True, **kwargs):
        if (engine is None) == (optimizer is None):
            raise TypeError("SlimtuneTrainer: give engine= (from_recipe builds one) or optimizer= (a slimtune "
                            "optimizer name), not both and not neither")
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise TypeError("SlimtuneTrainer builds its optimizer (engine= or optimizer=); drop optimizers=")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and training_args.fsdp:  # before transformers' own checks of it
            raise RecipeError([FSDP_REFUSED])
        super().__init__(*args, **kwargs)
        if getattr(engine, "updates", None) is not None:
            raise RecipeError(["offload.optimizer_state cpu/nvme: the optimizer state lives in the offload engine, "
                               "which a Trainer checkpoint (optimizer.pt) cannot hold; train this recipe with "
                               "slimtune train, or keep offload.optimizer_state gpu on the Hugging Face route"])
        self.world = self.accelerator.num_processes
        if self.world > 1:
            destroy_process_group_at_exit()
            refuse_under_processes(engine, per_layer)
        if engine is None:
            engine = InMemoryEngine(self.model, self.args.device)
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            hparams = dict(optimizer_kwargs or {})
            if optimizer in SEEDED:
                hparams.setdefault("seed", self.args.seed)
            if per_layer:
                hparams["per_layer"] = True
            built = build_optimizer(optimizer, named, lr=self.args.learning_rate,
                                    weight_decay=self.args.weight_decay, **hparams)
            if per_layer and self.args.max_grad_norm > 0:
                raise RecipeError(["per_layer: global-norm clipping needs every gradient at once; set "
                                   "TrainingArguments(max_grad_norm=0)"])
            engine.set_optimizer(built, per_layer=per_layer)
        self.engine, self.data_seed = engine, data_seed
        # the Trainer wraps self.optimizer (accelerate) when training starts; engine_optimizer stays ours
        self.engine_optimizer = self.optimizer = EngineOptimizer(engine, self.args.max_grad_norm)
        self.args.max_grad_norm = 0.0  # the engine clips (EngineOptimizer.step)
        self.zeroth_order = self.engine_optimizer.zeroth_order
        self.chunked_loss = chunked_loss and chunked_loss_supported(self.model) is None
        self.step_losses: list[float] = []
        self._micro: list[dict[str, torch.Tensor]] = []  # the step's micro-batches so far
        self._tokens, self._window_start = 0, time.perf_counter()  # input tokens of this process since the last log

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's loader, or with ``data_seed`` ``slimtune train``'s order (:class:`SeededOrder`); a stream's
        micro-batches (:class:`~..streaming.StreamBatches`) as they come."""
        if isinstance(self.train_dataset, StreamBatches):  # it takes this process's share of the micro-batches
            # not accelerate's loader: its dispatcher builds a DataLoader whose iterator draws from torch's RNG
            # (and would shift every dropout mask against slimtune train's); the Trainer moves inputs to the device
            return DataLoader(self.train_dataset, batch_size=None, generator=torch.Generator().manual_seed(0))
        if self.data_seed is None:
            return super().get_train_dataloader()
        loader = DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                            sampler=SeededOrder(len(self.train_dataset), self.data_seed),
                            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(self.data_seed))  # no draw from torch's RNG
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ the step
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """One micro-batch: slimtune's loss and backward through the engine (or, for a zeroth-order optimizer, the
        whole step at the last micro-batch). The Trainer then calls ``optimizer.step()`` (:class:`EngineOptimizer`)."""
        final = self.accelerator.sync_gradients  # the step's last micro-batch
        self._micro.append(inputs)
        self._tokens += input_tokens(inputs)
        if not final:
            return torch.zeros((), device=self.args.device)
        group, self._micro = self._micro, []
        loss = self._zeroth_order_step(group) if self.zeroth_order else self._backward(model, group)
        self.step_losses.append(loss)
        return torch.tensor(loss, device=self.args.device)

    def _backward(self, model: torch.nn.Module, group: list[dict[str, Any]]) -> float:
        """Forward and backward of every micro-batch of the step, token-weighted (held until the last one so the
        weights are known, as ``slimtune train`` does; the Trainer has fetched them all already). Across processes
        the weights are global: micro-batch i of a rank weighs ``n_i * processes / (tokens of all ranks)``, so
        DDP's mean of the ranks' gradients is the gradient of one batch of every rank's examples; the gradient
        all-reduce runs once, in the last backward. Returns the step's loss over all processes."""
        several = self.world > 1
        total = self._all_ranks(float(sum(supervised_tokens(b["labels"]) for b in group)))
        model.train()
        loss_sum = backward_step(
            self.model, group, self.engine, self.args.device, self.args.bf16, self.chunked_loss and not several,
            total=total, scale=self.world, backward=self.accelerator.backward, wrapped=model if several else None,
            around=(lambda last: nullcontext() if last else self.accelerator.no_sync(model)) if several else None)
        return self._all_ranks(loss_sum) / self.world

    def _zeroth_order_step(self, group: list[dict[str, Any]]) -> float:
        """MeZO over every process's examples: each rank draws the same z (the shared seed), and the loss of a
        perturbation is the token-weighted loss over all ranks' micro-batches, one all-reduce of two scalars; so
        every rank computes the same projected gradient and update, and no gradient crosses a process."""
        tokens = float(sum(supervised_tokens(b["labels"]) for b in group))

        def closure() -> float:
            local = zeroth_order_loss(self.model, group, self.args.device, self.args.bf16)
            if self.world == 1:
                return local
            both = self.accelerator.reduce(torch.tensor([local * tokens, tokens], dtype=torch.float64,
                                                        device=self.args.device), reduction="sum")
            return float(both[0] / both[1])

        return self.engine.zeroth_order_step(group, closure)

    def _all_ranks(self, value: float) -> float:
        """``value`` summed over the processes (itself with one)."""
        if self.world == 1:
            return value
        summed = self.accelerator.reduce(torch.tensor([value], dtype=torch.float64, device=self.args.device),
                                         reduction="sum")
        return float(summed[0])

    # ------------------------------------------------------------------ logs, eval, save
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs; training logs gain the engine's pre-clip ``grad_norm`` and :func:`memory_logs` (so
        every reporter, TensorBoard or W&B, sees them)."""
        if "loss" in logs:
            if self.engine_optimizer.grad_norm is not None:
                logs["grad_norm"] = self.engine_optimizer.grad_norm
            now = time.perf_counter()  # every process reads about as many tokens (the batches are its share)
            logs["tokens_per_s"] = self._tokens * self.world / max(now - self._window_start, 1e-9)
            self._tokens, self._window_start = 0, now
            logs.update(memory_logs(self.args.device, self.model, self.engine, self.args.logging_steps))
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        """Deferred (zeroth-order) updates land first."""
        self.engine.sync()
        return super().evaluate(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Deferred updates land first; a full fine-tune whose layers the engine streams is written by the engine
        (a shard at a time, never whole), anything else by the Trainer."""
        self.engine.sync()
        if getattr(self.engine, "streamer", None) is not None and not is_adapter_model(self.model):
            target = Path(output_dir or self.args.output_dir)
            if self.args.should_save:
                self.engine.save_model(target)
            return
        super().save_model(output_dir, _internal_call=_internal_call)

    def train(self, *args, **kwargs):
        """The Trainer's ``train``, deferred updates applied when it ends (also on failure). ``engine.close()``
        stops the engine (hooks removed, swap files deleted) once the model is no longer needed."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.engine.sync()


def is_adapter_model(model: torch.nn.Module) -> bool:
    """Whether some weights are frozen (an adapter run saves the adapter; a full run saves every weight)."""
    return any(not p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------------- callback
