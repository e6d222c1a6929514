"""lmms-eval plugin model `pruned_lvlm`: a Hugging Face LLaVA checkpoint with a token-reduction method applied.

    python -m lmms_eval --model pruned_lvlm \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=visiondrop,budget=64 --tasks pope --output_path out

Registered through the entry-point group `lmms_eval.models` (visiondrop/harness/manifest.py); no fork of lmms-eval.
Model args (`--model_args k=v,...`, or keywords of `PrunedLVLM(...)` for `simple_evaluate(model=instance)`):
- pretrained: local folder or hub id of a checkpoint of a supported family (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL,
  Video-LLaVA: `visiondrop.families`); video tasks (visuals that are video file paths) need a family that takes
  videos: each video is decoded with PyAV, 8 frames sampled uniformly (`visiondrop.harness.video`); stock task
  modules that import decord (LongVideoBench) load with a stand-in that the model installs when it is built
  (`visiondrop.harness.stock_tasks`);
- method (default "none") and budget (average visual tokens per decoder layer; "full"/None = the method's own
  setting), passed to `visiondrop.apply`; any other key=value is a method option (`k=3`, `layer_list=[8,16,24]`,
  `schedule={"encoder":[42,6],...}`: values are read as JSON or Python literals, else kept as strings);
- dtype (bfloat16 on cuda, float32 on cpu; "auto" = the checkpoint's), device (cuda if available, else cpu),
  attn_implementation (sdpa), batch_size (left-padded batches; results equal those of batch size 1; set it with
  lmms-eval's own `--batch_size`, which the CLI always passes and which would clash with a model arg; a batch that
  runs out of GPU memory is halved and retried, down to 1, and the rest of the run keeps the smaller size:
  `run_info` records `batch_size_used` and `oom_retries`);
- image_aspect_ratio: "pad" (LLaVA-1.5 eval: expand to a square with the CLIP mean colour) or "none" (the
  processor's own resize and crop); the default is the family's (`Family.image_aspect_ratio`: "pad" for 1.5,
  "none" for NeXT);
- conv_template: "vicuna_v1" (LLaVA eval prompt with the system sentence) or "llava_hf" / "chat_template" (the
  checkpoint's chat template); the default is the family's (`Family.conv_template`: "vicuna_v1" for both LLaVA
  families, "chat_template" for Qwen2.5-VL);
- min_pixels, max_pixels (Qwen2.5-VL): bounds of the resized image's area, as the checkpoint's processor takes
  them (its defaults otherwise; lmms-eval's own qwen2_5_vl model uses max_pixels=1605632).

An image or video that cannot be decoded fails the evaluation with an UndecodableVisual naming the task, the doc and
the file. `run_info` records the method, its resolved schedule, the preprocessing and the measured "# Tokens" (mean over
evaluated samples with an image of the trace's mean visual tokens per decoder layer); `position_maps` aggregates
every such sample's trace into positional-bias maps (where in the image the kept tokens come from, per cut).
"""
from __future__ import annotations

import ast
import atexit
import gc
import json
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig

import visiondrop
from visiondrop.families import family_for

from . import stock_tasks
from .positions import PositionMaps
from .prompting import ASPECT_RATIOS, CONV_TEMPLATES, build_prompt, expand_to_square, instruction, mean_colour
from .video import read_frames

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA's model_vqa_loader default, for tasks that do not say


class UndecodableVisual(ValueError):
    """A sample's image or video could not be read: names the task, the doc and the file."""


class PrunedLVLM(lmms):
    def __init__(self, pretrained: str, method: str = "none", budget: float | str | None = None,
                 dtype: str | torch.dtype | None = None, device: str | None = None,
                 attn_implementation: str = "sdpa", batch_size: int | str = 1, image_aspect_ratio: str | None = None,
                 conv_template: str | None = None, max_batch_size: int | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, frames: int | None = None, **options: Any) -> None:
        super().__init__()
        stock_tasks.prepare()  # before lmms-eval imports any task module (it builds the model first)
        del max_batch_size  # lmms-eval passes it for batch_size=auto, which this model does not offer
        self._batch_size = _positive_int(batch_size, "batch_size")
        self.family = family = family_for(AutoConfig.from_pretrained(pretrained))
        self.conv_template = conv_template or family.conv_template
        if self.conv_template not in CONV_TEMPLATES:
            raise ValueError(f"unknown conv_template {self.conv_template!r}; available: {', '.join(CONV_TEMPLATES)}")
        self._device = self._setup_device(device)
        self._dtype = _resolve_dtype(dtype, self._device)

        self._model = family.model_class.from_pretrained(
            pretrained, dtype=self._dtype, attn_implementation=attn_implementation).to(self._device).eval()
        self.processor_options = {k: _positive_int(v, k) for k, v in
                                  (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.processor = family.load_processor(pretrained, **self.processor_options)
        # frames sampled per video: the checkpoint's own (Video-LLaVA: 8) unless given
        self.frames = None if frames is None else _positive_int(frames, "frames")
        self.processor.tokenizer.padding_side = "left"  # batches end together: generation and continuations align

        self.image_aspect_ratio = image_aspect_ratio or family.image_aspect_ratio
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"unknown image_aspect_ratio {self.image_aspect_ratio!r}; available: "
                             f"{', '.join(ASPECT_RATIOS)}")
        self._background = mean_colour(self.processor.image_processor.image_mean)
        self.pretrained = pretrained

        self.method, self.budget = method, _parse_budget(budget)
        self.options = {key: _parse_value(value) for key, value in options.items()}
        self.handle = visiondrop.apply(self._model, method, self.budget, **self.options)
        self.reset_measurements()

    # -- what lmms-eval and the harness read -------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def config(self):  # simple_evaluate names the run after config._name_or_path when given an instance
        return self._model.config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def run_info(self) -> dict:
        """The method, its resolved schedule, the preprocessing, and what was measured since the last reset.

        samples: model inputs evaluated (requests: a multiple-choice doc counts once per choice);
        measured_tokens_mean: over those with an image, the trace's mean visual tokens per decoder layer.
        """
        return {
            "pretrained": str(self.pretrained),
            "method": self.method,
            "budget": self.budget,
            "options": self.options,
            "policy": self.handle.policy.describe(),
            "image_aspect_ratio": self.image_aspect_ratio,
            "conv_template": self.conv_template,
            **({"processor_options": self.processor_options} if self.processor_options else {}),
            **({"frames": self.frames} if self.frames else {}),
            "dtype": str(self._dtype).removeprefix("torch."),
            "measured_tokens_mean": self._token_sum / self._image_samples if self._image_samples else None,
            "text_tokens_mean": self._text_sum / self._image_samples if self._image_samples else None,
            "samples": self._samples,
            "samples_with_image": self._image_samples,
            "batch_size": self._batch_size,
            "batch_size_used": self._working_batch,  # below batch_size after CUDA out-of-memory errors
            "oom_retries": self._oom_retries,
        }

    def reset_measurements(self) -> None:
        """Start counting afresh, e.g. before evaluating this instance on another task."""
        self._samples = self._image_samples = self._oom_retries = 0
        self._working_batch = self._batch_size
        self._token_sum = self._text_sum = 0.0
        self.position_maps = PositionMaps(self.family.patch_grid(self._model.config))

    def clean(self) -> None:
        """Keep the model: lmms-eval's default deletes it after each evaluation; one instance may serve many tasks."""
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # -- requests ----------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str] = [""] * len(requests)
        tokenizer = self.processor.tokenizer
        with tqdm(total=len(requests), desc="pruned_lvlm generate", disable=self.rank != 0) as bar:
            def step(indices: list[int]) -> None:
                args = [requests[i].args for i in indices]
                settings, until = _generation_settings(args[0][1], tokenizer)
                images = [self._image(*a[2:6]) for a in args]
                prompts = [self._prompt(a[0], image) for a, image in zip(args, images)]
                batch = self._encode(prompts, images)
                self._instruct([a[0] for a in args], images)
                with torch.inference_mode():
                    out = self._model.generate(**batch, **settings)
                self._record(images, batch)
                texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text in zip(indices, texts):
                    results[i] = _cut_at_stop(text, until).strip()
                bar.update(len(indices))

            for indices in self._batches(requests, key=lambda args: json.dumps(args[1], sort_keys=True, default=str)):
                self._halving_on_oom(indices, step)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request: (negative log-likelihood of the continuation summed over its tokens, whether it is greedy).

        lmms-eval 0.7.3 turns a bare tuple into a string, so each pair travels in `GenerationResult.text`.
        """
        results: list[GenerationResult] = [None] * len(requests)  # type: ignore[list-item]
        tokenizer = self.processor.tokenizer
        with tqdm(total=len(requests), desc="pruned_lvlm loglikelihood", disable=self.rank != 0) as bar:
            def step(indices: list[int]) -> None:
                prompts, continuations, images = [], [], []
                for i in indices:
                    context, target, *where = requests[i].args  # (ctx, cont) for unconditional mutual-info requests
                    image = self._image(*where[:4]) if where else None
                    if callable(target):
                        target = target(self.task_dict[where[2]][where[3]][where[1]])
                    prompts.append(self._prompt(context, image))
                    continuations.append(str(target))
                    images.append(image)
                full = [p + t for p, t in zip(prompts, continuations)]
                # As lmms-eval's own LLaVA models: the continuation is what the full prompt adds after the context.
                lengths = [len(tokenizer(f).input_ids) - len(tokenizer(p).input_ids) for p, f in zip(prompts, full)]
                keep = max(lengths) + 1
                batch = self._encode(full, images)
                self._instruct([requests[i].args[0] for i in indices], images)
                with torch.inference_mode():
                    logits = self._model(**batch, logits_to_keep=keep).logits.float()
                self._record(images, batch)
                # Left padding (and pruning only before the text) keeps every continuation at the right end.
                logprobs = logits[:, :-1].log_softmax(-1)
                ids = batch["input_ids"]
                targets = ids[:, ids.shape[1] - keep + 1:]
                for row, (i, n) in enumerate(zip(indices, lengths)):
                    lp, tgt = logprobs[row, keep - 1 - n:], targets[row, keep - 1 - n:]
                    nll = -float(lp.gather(-1, tgt[:, None]).sum())
                    results[i] = GenerationResult(text=(nll, bool((lp.argmax(-1) == tgt).all())))
                bar.update(len(indices))

            for indices in self._batches(requests, key=lambda args: None):
                self._halving_on_oom(indices, step)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("pruned_lvlm does not run multi-round tasks (generate_until_multi_round): the "
                                  "engine prunes one image prefill per sample; use single-round tasks")

    # -- helpers -----------------------------------------------------------------------------------------------
    def _setup_device(self, device: str | None) -> torch.device:
        """Single process, or one rank of lmms-eval's data-parallel `accelerate launch` (one GPU per rank)."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            atexit.register(_leave_process_group)
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            if device in (None, "cuda"):
                return self.accelerator.device
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _batches(self, requests: list[Instance], key: Callable[[tuple], Any]) -> Iterator[list[int]]:
        """Indices of requests in batches that share `key` (generation settings), longest contexts first."""
        groups: dict[Any, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(key(request.args), []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(str(requests[i].args[0])))
            start = 0
            while start < len(indices):  # the size is read per batch: it drops after an out-of-memory error
                batch = indices[start:start + self._working_batch]
                yield batch
                start += len(batch)

    def _halving_on_oom(self, indices: list[int], step: Callable[[list[int]], None]) -> None:
        """`step(indices)`; on CUDA out-of-memory, halve the batch (and every later one) and run the halves, down to
        batches of one. Batches equal samples alone, so the answers do not change."""
        try:
            step(indices)
            return
        except torch.cuda.OutOfMemoryError:
            if len(indices) == 1:
                raise
        # retried outside the except block: the error's traceback holds the failed batch's tensors
        self._working_batch = min(self._working_batch, (len(indices) + 1) // 2)
        self._oom_retries += 1
        log.warning("CUDA out of memory at batch size %d: retrying in batches of %d (the rest of the run too)",
                    len(indices), self._working_batch)
        self.clean()
        start = 0
        while start < len(indices):  # read per part: a half that fails again lowers it for the parts after it
            size = self._working_batch
            self._halving_on_oom(indices[start:start + size], step)
            start += size

    def _image(self, doc_to_visual: Callable | None, doc_id: int, task: str, split: str
               ) -> Image.Image | np.ndarray | None:
        """The sample's image, or its video's frames [frames, H, W, 3] (a visual given as a video file's path)."""
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if callable(doc_to_visual) else None
        except (OSError, ValueError, SyntaxError) as err:  # PIL: OSError, UnidentifiedImageError, SyntaxError
            raise UndecodableVisual(f"{task} doc {doc_id}: its visual could not be read ({type(err).__name__}: "
                                    f"{err})") from err
        visuals = [v for v in (visuals or []) if v is not None]
        if not visuals:
            return None
        if len(visuals) == 1 and isinstance(visuals[0], (str, os.PathLike)):
            if "video" not in self.family.feature_functions:
                raise ValueError(f"{task} gives videos, which {type(self._model).__name__} does not take; use a "
                                 "video model (Video-LLaVA)")
            try:
                return read_frames(visuals[0], self.frames or self.family.frames(self._model.config))
            except (OSError, ValueError) as err:  # PyAV's errors are OSError or ValueError subclasses
                raise UndecodableVisual(f"{task} doc {doc_id}: cannot decode the video {visuals[0]} "
                                        f"({type(err).__name__}: {err})") from err
        if len(visuals) > 1 or not isinstance(visuals[0], Image.Image):
            raise ValueError(f"pruned_lvlm takes one image or one video per sample; {task} doc {doc_id} gave "
                             f"{len(visuals)} visual(s) of type {type(visuals[0]).__name__}")
        try:
            return visuals[0].convert("RGB")  # decodes a lazily opened file
        except (OSError, ValueError, SyntaxError) as err:
            where = getattr(visuals[0], "filename", "") or "an image embedded in the data"
            raise UndecodableVisual(f"{task} doc {doc_id}: cannot decode {where} ({type(err).__name__}: "
                                    f"{err})") from err

    def _prompt(self, context: str, visual: Image.Image | np.ndarray | None) -> str:
        return build_prompt(self.processor, context, visual is not None, self.conv_template, _modality(visual))

    def _instruct(self, contexts: list[str], visuals: list) -> None:
        """Each sample's question for text-conditioned methods (CDPruner), one per sample with a visual."""
        self.handle.instruct([instruction(c) for c, v in zip(contexts, visuals) if v is not None])

    def _encode(self, prompts: list[str], visuals: list[Image.Image | np.ndarray | None]) -> dict:
        images = [self._preprocess(v) for v in visuals if isinstance(v, Image.Image)]
        videos = [v for v in visuals if isinstance(v, np.ndarray)]
        batch = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt",
                               **({"videos": videos} if videos else {}))
        return batch.to(self._device, self._model.dtype)  # casts only the floating tensors (pixel values)

    def _preprocess(self, image: Image.Image) -> Image.Image:
        return expand_to_square(image, self._background) if self.image_aspect_ratio == "pad" else image

    def _record(self, images: list[Image.Image | np.ndarray | None], batch: dict) -> None:
        """Add the measured visual tokens per decoder layer, and the kept positions, of this batch's samples with an
        image or a video."""
        self._samples += len(images)
        rows = [row for row, image in enumerate(images) if image is not None]
        if not rows:
            return  # a text-only forward leaves the trace of an earlier batch in place
        trace = self.handle.trace
        stride = len(trace.kept) // len(images)  # beam search prefills each sample's beams (repeat_interleave)
        tokens = trace.mean_tokens
        self._token_sum += sum(float(tokens[row * stride]) for row in rows)
        # a row per image (per video, where videos have a layout), in the order of the samples
        sizes = {"image": iter(batch.get(self.family.image_layout_key, ())),
                 "video": iter(batch.get(self.family.video_layout_key or "", ()))}
        for row in rows:
            modality = _modality(images[row])
            size = next(sizes[modality], None)
            cells = self.family.patch_cells(self._model, size, modality)
            self.position_maps.add_sample(cells, trace.cuts, trace.kept[row * stride], modality)
        real = batch["attention_mask"].bool()  # placeholders in the padding are padding (a shorter video's frames)
        visual = self.family.image_token_mask(self._model, batch["input_ids"], None) & real
        text = real.sum(1) - visual.sum(1)
        self._text_sum += float(text[rows].sum())  # non-visual prompt tokens, for the FLOPs of the run
        self._image_samples += len(rows)


def _modality(visual: Image.Image | np.ndarray | None) -> str:
    """The `Family.feature_functions` key of a sample's visual: `_image` gives a video as its frames' array."""
    return "video" if isinstance(visual, np.ndarray) else "image"


def _generation_settings(gen_kwargs: dict, tokenizer: Any) -> tuple[dict, list[str]]:
    """generate() keywords from a task's generation_kwargs: greedy unless temperature > 0 (as LLaVA's eval)."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature") or 0)
    settings: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        "do_sample": temperature > 0,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    if temperature > 0:
        settings.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
    if int(gen_kwargs.get("num_beams") or 1) > 1:  # the engine reorders its pruned cache bookkeeping with the beams
        settings["num_beams"] = int(gen_kwargs["num_beams"])
    if until:
        settings.update(stop_strings=until, tokenizer=tokenizer)
    return settings, until


def _cut_at_stop(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _parse_budget(budget: float | str | None) -> float | int | None:
    if budget is None or (isinstance(budget, str) and budget.strip().lower() in ("", "full", "none", "null")):
        return None
    value = float(budget)
    return int(value) if value.is_integer() else value


def _parse_value(value: Any) -> Any:
    """A method option from `--model_args`: JSON or a Python literal where it parses as one, else the string."""
    if not isinstance(value, str):
        return value
    if value.strip().lower() in ("none", "null"):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError, TypeError):
            pass
    return value


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> str | torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; available: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _positive_int(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def _leave_process_group() -> None:
    """A rank that exits with its gloo process group alive can abort in the group's destructor ("terminate called
    without an active exception", exit -6) after its answers are written: leave the group first."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
