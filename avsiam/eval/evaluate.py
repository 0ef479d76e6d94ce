"""``avsiam evaluate``: score trained weights on a split (test by default), deterministically.

Finetuned weights: every clip's 10 frames are fused with its audio and the probabilities are
averaged over frames; ``results.json`` holds mAP (multi-label) or accuracy (single-label) for
the multimodal, audio-only and visual-only heads, ``per_class.csv`` the per-class AP.
Pretrained weights (a pretraining recipe): audio-visual retrieval recall@k.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from avsiam.config import RecipeConfig
from avsiam.data.datasets import EvalClips
from avsiam.data.index import load_index
from avsiam.eval.predict import distributed_retrieval_recall, embed_clips, eval_loader, predict_probabilities
from avsiam.eval.report import EvaluationResults, evaluation_results, write_report
from avsiam.launch.distributed import init_distributed, on_cpu
from avsiam.model import build_finetune_model_from_recipe, build_pretrain_model_from_recipe, load_pretrained
from avsiam.model.weights import CheckpointError, published_size


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Strictly load a consolidated safetensors file, or a published AVSiam checkpoint (its
    load report logged); a mismatch names the keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path}: no such file")
    if published_size(path):
        report = load_pretrained(model, path)  # logs the report
        lacking = [k for k in report.missing if not k.startswith("decoder.")]  # retrieval needs no decoder
        if lacking:
            groups = ", ".join(sorted({k.split(".")[0] for k in lacking}))
            raise CheckpointError(f"{path}: a published checkpoint without {groups} tensors (e.g. {lacking[:3]}): a pretrained "
                             "checkpoint has no classification heads; finetune it first (avsiam train finetune --init)")
        return
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}); check --model and --recipe"
        )


def evaluate(recipe: RecipeConfig, weights: str | Path, data: str | Path, output: str | Path, split: str = "test") -> EvaluationResults:
    env = init_distributed()
    device = torch.device("cpu") if on_cpu() else torch.device("cuda", env.local_rank)
    index = load_index(data)
    if env.is_main:
        index.check_shards()
    dataset = EvalClips(index, split, recipe)
    loader = eval_loader(dataset, env, recipe.batch_size_per_gpu, recipe.num_workers)
    output = Path(output)
    if recipe.stage == "pretrain":
        model = build_pretrain_model_from_recipe(recipe).to(device)
        load_weights(model, weights)
        audio, visual = embed_clips(model.encoder, loader, device=device)
        results = EvaluationResults(metric="retrieval", split=split, num_clips=len(dataset),
                                    **distributed_retrieval_recall(audio, visual, env, device))
        if env.is_main:
            results.write(output)
        return results
    model = build_finetune_model_from_recipe(recipe, index.num_classes).to(device)
    load_weights(model, weights)
    probabilities = predict_probabilities(model, loader, multi_label=index.multi_label, device=device)
    targets = dataset.exact_targets()
    results = EvaluationResults(split=split, model=recipe.model, recipe=recipe.recipe,
                                **evaluation_results(probabilities, targets, index.multi_label))
    if env.is_main:
        write_report(output, results, probabilities, targets, index.classes.mids, index.classes.names)
    return results
