"""nanfuse.integrations.transformers on tiny randomly initialised GPT-2 and Llama models (no downloads):
the loss and gradients equal the stock model's, and Trainer steps with the guarded optimizer give the
same parameters as Trainer with the stock loss and its own clipping.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install 'nanfuse[hf]'")

from helpers import assert_close  # noqa: E402

from nanfuse.integrations.transformers import GuardedOptimizer, use_nanfuse_loss  # noqa: E402

VOCAB, SEQ = 101, 16
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0),  # no dropout: both runs see the same network
    "llama": lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                              max_position_embeddings=64),
}


def tiny_model(name):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config)


def example(generator, n_rows=3):
    input_ids = torch.randint(0, VOCAB, (n_rows, SEQ), generator=generator)
    labels = input_ids.clone()
    for row in range(n_rows):  # right padding of different lengths: ignored positions
        labels[row, SEQ - 2 - 3 * row:] = -100
    return input_ids, labels


@pytest.mark.parametrize("num_items", [None, 29])
@pytest.mark.parametrize("name", CONFIGS)
def test_loss_and_gradients_equal_the_stock_models(name, num_items):
    stock = tiny_model(name)
    ours = use_nanfuse_loss(copy.deepcopy(stock))
    input_ids, labels = example(torch.Generator().manual_seed(1))
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    losses = []
    for model in (stock, ours):
        loss = model(input_ids=input_ids, labels=labels, **kwargs).loss
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0].double(), torch.float32, "loss")
    for (param_name, a), b in zip(stock.named_parameters(), ours.parameters()):
        assert_close(b.grad, a.grad.double(), torch.float32, f"grad of {param_name}")


class Examples(torch.utils.data.Dataset):
    def __init__(self, n):
        generator = torch.Generator().manual_seed(2)
        self.items = [dict(zip(("input_ids", "labels"), (t[0] for t in example(generator, 1)))) for _ in range(n)]
        for i, item in enumerate(self.items):  # ragged targets, so num_items_in_batch matters
            item["labels"][SEQ - 1 - i % 7:] = -100

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def train(model, tmp_path, optimizer=None, max_grad_norm=0.0):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, max_grad_norm=max_grad_norm, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Examples(32),
                                   optimizers=(optimizer, None))
    trainer.train()
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_trainer_steps_equal_the_stock_loss(name, tmp_path):
    stock = tiny_model(name)
    ours = use_nanfuse_loss(copy.deepcopy(stock))
    train(stock, tmp_path / "stock", max_grad_norm=0.05)  # Trainer's AdamW (fused on CPU) and its own clip
    optimizer = GuardedOptimizer(torch.optim.AdamW(ours.parameters(), lr=3e-3, weight_decay=0.0, fused=True),
                                 max_norm=0.05)
    train(ours, tmp_path / "ours", optimizer)
    assert optimizer.guard.steps == 4 and optimizer.skipped_steps.item() == 0
    moved = 0.0
    for (param_name, a), b in zip(stock.named_parameters(), ours.parameters()):
        # Adam divides by sqrt(v): fp32 rounding differences in tiny gradients move a step by up to ~1e-6;
        # 1e-5 is 0.3% of one step (lr 3e-3), far below what a wrong loss or a missed clip would give
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{param_name} after 4 steps: {m}")
        moved = max(moved, (a - tiny_model(name).get_parameter(param_name)).abs().max().item())
    assert moved > 1e-3  # the steps did move the parameters


def test_guarded_optimizer_skips_a_nan_step_under_trainer(tmp_path):
    model = use_nanfuse_loss(tiny_model("gpt2"))
    poisoned = {"calls": 0}

    def poison(module, grad_input, grad_output):  # one backward pass produces a NaN gradient
        poisoned["calls"] += 1
        if poisoned["calls"] == 3:
            return (torch.full_like(grad_input[0], float("nan")),)

    model.lm_head.register_full_backward_hook(poison)
    optimizer = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True), max_norm=1.0)
    train(model, tmp_path, optimizer)
    assert optimizer.skipped_steps.item() == 1 and optimizer.guard.steps == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("given", ["int", "0-dim", "(1, 1) as DataParallel scatters it"])
def test_every_form_of_num_items_trainer_passes_gives_the_stock_loss(given):
    # an int (custom loops; transformers' own loss takes one), and under DataParallel a (1, 1) tensor per replica
    from transformers.loss.loss_utils import ForCausalLMLoss

    from nanfuse.integrations.transformers import causal_lm_loss

    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3:] = -100
    num_items = {"int": 7, "0-dim": torch.tensor(7), "(1, 1) as DataParallel scatters it": torch.full((1, 1), 7.0)}
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = causal_lm_loss(x, labels, 11, num_items_in_batch=num_items[given])
    stock = ForCausalLMLoss(y, labels, 11, num_items_in_batch=num_items[given])
    assert_close(ours, stock.double().reshape(()), torch.float32, "loss")
    ours.backward()
    stock.sum().backward()
    assert_close(x.grad, y.grad.double(), torch.float32, "gradient")


@pytest.mark.parametrize("zero", [0, torch.tensor(0)], ids=["int", "tensor"])
def test_no_target_in_the_whole_batch_gives_zero_whatever_the_type_of_num_items(zero):
    # num_items_in_batch = 0: every label of every accumulated micro-batch ignored; an int 0 was refused
    from nanfuse.integrations.transformers import causal_lm_loss

    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((2, 5), -100), 11, num_items_in_batch=zero)
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()
