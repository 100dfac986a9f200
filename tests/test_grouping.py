"""param_groups on a real transformers LLaMA: which parameters get the structured update."""
import torch
from torch import nn

import ds_structopt as dso


def tiny_llama(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def by_name(groups):
    return {g["name"]: g for g in groups}


def test_llama_split():
    model = tiny_llama()
    groups = by_name(dso.param_groups(model, weight_decay=0.1))
    structured = groups["structured"]["param_names"]
    assert all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) for n in structured)
    assert len(structured) == 2 * 7
    assert set(groups["elementwise"]["param_names"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert groups["elementwise"]["weight_decay"] == 0.1
    no_decay = groups["elementwise_no_decay"]
    assert all("norm" in n for n in no_decay["param_names"]) and no_decay["weight_decay"] == 0.0
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_tied_head_appears_once_and_trains():
    model = tiny_llama(tie=True)
    groups = dso.param_groups(model)
    names = [n for g in groups for n in g["param_names"]]
    assert len(names) == len(set(names)) and "lm_head.weight" not in names
    opt = dso.AdaDiagPP(groups, lr=1e-2, update_freq=5)
    ids = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # embeddings went to AdamW: their state is Adam's, not a rotation
    emb_state = opt.state[model.model.embed_tokens.weight]
    assert "P" not in emb_state and emb_state["exp_avg_sq"].shape == (64, 32)


def test_custom_patterns_and_options():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    groups = by_name(dso.param_groups(model, elementwise_patterns=[r"^1\."], structured_options={"lr": 0.5},
                                      elementwise_options={"lr": 0.1}))
    assert groups["structured"]["param_names"] == ["0.weight"] and groups["structured"]["lr"] == 0.5
    assert groups["elementwise"]["param_names"] == ["1.weight"] and groups["elementwise"]["lr"] == 0.1
    opt = dso.ASGO(list(groups.values()))
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1, 0.1]  # elementwise_options: both AdamW groups


def test_named_parameters_route_embeddings_to_adamw():
    """Passing model.named_parameters() directly: names decide, as with param_groups()."""
    model = tiny_llama()
    opt = dso.AdaDiagPP(model.named_parameters(), lr=1e-2, update_freq=5)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert "P" not in opt.state[model.model.embed_tokens.weight]
    assert "P" not in opt.state[model.lm_head.weight]
    assert "P" in opt.state[model.model.layers[0].self_attn.q_proj.weight]
    # and patterns can be changed per optimizer
    model2 = tiny_llama()
    opt2 = dso.AdaDiagPP(model2.named_parameters(), elementwise_patterns=["q_proj"])
    model2(input_ids=ids, labels=ids).loss.backward()
    opt2.step()
    assert "P" in opt2.state[model2.lm_head.weight]
    assert "P" not in opt2.state[model2.model.layers[0].self_attn.q_proj.weight]
