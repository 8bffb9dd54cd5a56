"""transformers' Trainer on a patched ConvNeXt: the `hf` extra brings what it needs (accelerate), and a few
training steps give transformers' own losses and weights (the unpatched run is the oracle)."""
import pytest
import torch
import transformers

from fastconvnext import patch
from helpers import randomize_

TINY = dict(hidden_sizes=[8, 12, 20, 24], depths=[1, 2, 1, 1], layer_scale_init_value=0.5, num_labels=3)


class _Images(torch.utils.data.Dataset):
    def __init__(self, count=8):
        generator = torch.Generator().manual_seed(1)
        self.pixels = torch.randn(count, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def _train(tmp_path, patched):
    patch.unpatch_transformers()
    if patched:
        patch.patch_transformers()
    try:
        torch.manual_seed(0)
        model = randomize_(transformers.ConvNextForImageClassification(transformers.ConvNextConfig(**TINY)))
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path / ("patched" if patched else "plain")), per_device_train_batch_size=4,
            max_steps=3, learning_rate=1e-2, optim="sgd", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_Images())
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, {name: p.detach().clone() for name, p in model.named_parameters()}
    finally:
        patch.unpatch_transformers()


def test_trainer_on_patched_convnext_matches_transformers(tmp_path):
    plain_losses, plain_weights = _train(tmp_path, patched=False)
    patched_losses, patched_weights = _train(tmp_path, patched=True)
    assert len(plain_losses) == 3
    assert patched_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5)
    # SGD, so an update is lr times the gradient: weights differ by what the gradients differ (CONTRIBUTING: 1e-4)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(patched_weights[name], weight, rtol=1e-4, atol=1e-4, msg=name)


def test_the_hf_and_test_extras_bring_accelerate():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("hf", "test"):
        assert any(requirement.startswith("accelerate") for requirement in extras[extra]), extra
