"""Extractive QA evaluation: SQuAD loading, prompts, EM/F1, cached greedy decoding, the evaluator."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import jinja2
import numpy as np
import pytest
import yaml
from ml_collections import ConfigDict

from easylm_align import checkpoint, evaluate, model
from easylm_align.evaluation import qa, squad
from easylm_align.evaluation.generation import GreedyDecoder, bucket_length, newline_token_ids
from easylm_align.sharding import make_mesh, param_shardings
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer

NEWLINE_ID = 13  # <0x0A> in the demo tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(str(DEMO_TOKENIZER))


@pytest.fixture(scope="module")
def xquad_hi(test_data):
    return squad.load_squad(test_data / "xquad" / "xquad.hi.json")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def test_normalisation_punctuation_articles_whitespace():
    for mode in squad.METRIC_MODES:
        assert squad.normalize_answer("  The  Eiffel-Tower!! ", mode) == "eiffeltower"
    assert squad.exact_match("an apple", ["Apple."]) == 1.0
    assert squad.exact_match("theatre", ["atre"]) == 0.0  # articles only as whole words
    assert squad.f1_score("the big red dog", ["red dog"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert squad.f1_score("a b c", ["b c d"]) == pytest.approx(0.8)  # "a" goes: P=1, R=2/3
    assert squad.f1_score("", ["red dog"]) == 0.0


def test_squad_v1_is_the_default_and_strips_ascii_punctuation_only():
    # The official v1.1 script (the fork's `squad` metric) removes string.punctuation: the Hindi
    # danda, the Greek question mark (U+037E) and guillemets stay and cost the match.
    assert squad.exact_match("दिल्ली।", ["दिल्ली"]) == 0.0
    assert squad.f1_score("नई दिल्ली।", ["नई दिल्ली"]) == pytest.approx(0.5)
    assert squad.exact_match("Αθήνα\u037e", ["Αθήνα"]) == 0.0
    assert squad.exact_match("«Αθήνα»", ["Αθήνα"]) == 0.0
    assert squad.exact_match("The Broncos.", ["broncos"]) == 1.0
    assert squad.f1_score("กรุงเทพ", ["กรุงเทพมหานคร"]) == 0.0  # Thai has no spaces: one token each
    scores = squad.score_prediction("दिल्ली।", ["दिल्ली"])
    assert scores == {"em": 0.0, "f1": 0.0, "multilingual_em": 1.0, "multilingual_f1": 1.0}


def test_multilingual_mode_strips_unicode_punctuation():
    assert squad.exact_match("दिल्ली।", ["दिल्ली"], "multilingual") == 1.0
    assert squad.exact_match("«Αθήνα»\u037e", ["Αθήνα"], "multilingual") == 1.0
    assert squad.exact_match("「北京」。", ["北京"], "multilingual") == 1.0
    assert squad.exact_match("กรุงเทพฯ๚", ["กรุงเทพฯ"], "multilingual") == 1.0  # ๚ is punctuation, ฯ a letter


def test_mlqa_metric_follows_the_answer_language():
    assert squad.exact_match("दिल्ली।", ["दिल्ली"], "mlqa", "hi") == 1.0  # all P* punctuation goes
    assert squad.exact_match("the दिल्ली", ["दिल्ली"], "mlqa", "hi") == 0.0  # no articles for Hindi
    assert squad.exact_match("the Delhi", ["Delhi"], "mlqa", "en") == 1.0
    assert squad.exact_match("la casa", ["casa"], "mlqa", "es") == 1.0
    assert squad.normalize_answer("北京市，中国", "mlqa", "zh") == "北 京 市 中 国"  # mixed segmentation
    assert squad.f1_score("北京市", ["北京"], "mlqa", "zh") == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no rules for language 'th'"):
        squad.exact_match("x", ["x"], "mlqa", "th")


def test_multiple_golds_take_the_maximum():
    golds = ["Denver Broncos", "the Broncos", "Broncos team"]
    assert squad.exact_match("Broncos", golds) == 1.0  # "the Broncos" → "broncos"
    assert squad.f1_score("Denver", golds) == pytest.approx(2 / 3)
    assert squad.f1_score("Broncos team members", golds) == pytest.approx(0.8)


def test_multilingual_chinese_and_thai_are_scored_per_character():
    ml = "multilingual"
    assert squad.answer_tokens("北京市，中国", ml) == ["北", "京", "市", "中", "国"]
    assert squad.f1_score("北京市", ["北京"], ml) == pytest.approx(0.8)  # P=2/3, R=1
    assert squad.f1_score("北京市", ["北京"]) == 0.0  # SQuAD v1.1: one whitespace token each
    assert squad.exact_match("北 京", ["北京"], ml) == 1.0
    # Thai: combining marks stay with their consonant ("ที่" is one token).
    assert squad.answer_tokens("ที่นี่", ml) == ["ที่", "นี่"]
    assert squad.f1_score("กรุงเทพ", ["กรุงเทพมหานคร"], ml) == pytest.approx(2 / 3)  # 6 of 12 clusters: P=1, R=1/2
    assert squad.answer_tokens("Apollo 11 ในปี", ml) == ["apollo", "11", "ใ", "น", "ปี"]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def test_load_xquad(xquad_hi):
    assert len(xquad_hi) == 74  # tests/data keeps the first article (Super_Bowl_50)
    first = xquad_hi[0]
    assert first.id == "56beb4343aeaaa14008c925b" and first.answers == ("308",)
    assert first.context.startswith("पैंथर्स") and first.question.endswith("?")


def _write(tmp_path, root) -> str:
    path = tmp_path / "bad.json"
    path.write_text(root if isinstance(root, str) else json.dumps(root), encoding="utf-8")
    return str(path)


def _qa(**overrides):
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "me", "answer_start": 0}]}
    qa.update(overrides)
    return {k: v for k, v in qa.items() if v is not None}


@pytest.mark.parametrize("root, message", [
    ({"data": [{"paragraphs": [{"context": "c", "qas": [_qa(answers=None)]}]}]}, "question 'q1'.*missing 'answers'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [_qa(answers=[])]}]}]}, "question 'q1'.*empty"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [_qa(answers=["me"])]}]}]}, "question 'q1'.*'text'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [_qa(), _qa(id=None)]}]}]}, "question 1: missing 'id'"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [_qa(), _qa()]}]}]}, "question 'q1'.*duplicate"),
    ({"data": [{"paragraphs": [{"qas": []}]}]}, "article 0, paragraph 0: missing 'context'"),
    ({"version": "1.1"}, "'data' list"),
    ("{not json", "not valid JSON"),
])
def test_malformed_files_name_the_file_and_record(tmp_path, root, message):
    path = _write(tmp_path, root)
    with pytest.raises(squad.SquadFormatError, match=message) as err:
        squad.load_squad(path)
    assert str(err.value).startswith(path)


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

EXAMPLE = squad.QAExample("x1", "Paris is in France.", "Where is Paris?", ("France", "in France"))


def test_prompt_in_target_language_and_in_english():
    hi = squad.build_prompt(EXAMPLE, squad.prompt_labels("hi"))
    assert hi == "पृष्ठभूमि:\n\nParis is in France.\n\nसवाल:Where is Paris?\n\nउत्तर:"
    en = squad.build_prompt(EXAMPLE, squad.prompt_labels("en"))
    assert en == "Background:\n\nParis is in France.\n\nQuestion:Where is Paris?\n\nAnswer:"
    mlqa = squad.build_prompt(EXAMPLE, squad.prompt_labels("zh"), style="mlqa")
    assert mlqa == "背景:\n\nParis is in France.\n\n問題: Where is Paris?\n\n答案:"
    with pytest.raises(ValueError, match="no prompt labels"):
        squad.prompt_labels("xx")


# Real XQuAD records (ids from xquad.{hi,el,th}.json), whitespace as in the files: the Hindi
# context starts with a space and its question ends with one, the first Thai context ends with one.
XQUAD_SLICE = {
    "hi": [("56f8ca289b226e1400dd1007",
            " एक कागज का टुकड़ा बाद में पाया गया जिसपर लूथर ने अपनाआखिरी कथन लिखा। यह कथन “हम याचक हैं” जो जर्मन में था,  के अतिरिक्त लैटिन में था।",
            "लूथर के द्वारा लिखा गया बाद में क्या खोजा गया? ", "अपनाआखिरी कथन")],
    "el": [("56f8ca289b226e1400dd1007",
            "Αργότερα βρέθηκε ένα κομμάτι χαρτί στο οποίο ο Λούθερ είχε γράψει την τελευταία του δήλωση. Η δήλωση ήταν στα λατινικά, εκτός από το «Είμαστε ζητιάνοι», που ήταν στα γερμανικά.",
            "Τι ανακαλύφθηκε αργότερα που γράφτηκε από τον Λούθερ;", "την τελευταία του δήλωση")],
    "th": [("56bec6ac3aeaaa14008c93fd",
            "เลดีกากา ซึ่งชนะรางวัลแกรมมี หก รางวัล และได้เข้าชิงรางวัล อคาเดมี เป็นผู้ขับร้อง เพลงชาติ ในขณะที่ มาร์ลี แมตลิน ผู้ชนะรางวัลอคาเดมีเป็นผู้แปลให้เป็น ภาษามือแบบอเมริกัน ",
            "เลดีกากา ชนะแกรมมีกี่รางวัล", "หก"),
           ("56f8ca289b226e1400dd1007",
            "กระดาษชิ้นหนึ่งถูกพบในภายหลังซึ่งลูเทอร์ได้เขียน คำพูดสุดท้ายของเขา ไว้ คำพูดนั้นเขียนเป็นภาษาละติน นอกเหนือจาก \"We are beggars,\" ซึ่งเขียนเป็นภาษาเยอรมัน",
            "อะไรคือสิ่งที่ถูกค้นพบในภายหลังที่เขียนโดยลูเทอร์?", "คำพูดสุดท้ายของเขา")],
}

# What the fork's `ogx_xquad_{lang}` and `ogx_xquad_en{lang}` send to the model, written out from
# its documented format (BACKGROUND "\n\n" context "\n\n" QUESTION question "\n\n" ANSWER) on the
# documents as the Hugging Face `xquad` loader yields them (context and question stripped).
EXPECTED_PROMPTS = {
    ("hi", "hi"): ["पृष्ठभूमि:\n\nएक कागज का टुकड़ा बाद में पाया गया जिसपर लूथर ने अपनाआखिरी कथन लिखा। यह कथन “हम याचक हैं” जो जर्मन में था,  के अतिरिक्त लैटिन में था।\n\nसवाल:लूथर के द्वारा लिखा गया बाद में क्या खोजा गया?\n\nउत्तर:"],
    ("hi", "en"): ["Background:\n\nएक कागज का टुकड़ा बाद में पाया गया जिसपर लूथर ने अपनाआखिरी कथन लिखा। यह कथन “हम याचक हैं” जो जर्मन में था,  के अतिरिक्त लैटिन में था।\n\nQuestion:लूथर के द्वारा लिखा गया बाद में क्या खोजा गया?\n\nAnswer:"],
    ("el", "el"): ["Πληροφορίες ιστορικού:\n\nΑργότερα βρέθηκε ένα κομμάτι χαρτί στο οποίο ο Λούθερ είχε γράψει την τελευταία του δήλωση. Η δήλωση ήταν στα λατινικά, εκτός από το «Είμαστε ζητιάνοι», που ήταν στα γερμανικά.\n\nΕρώτηση:Τι ανακαλύφθηκε αργότερα που γράφτηκε από τον Λούθερ;\n\nΑπάντηση:"],
    ("el", "en"): ["Background:\n\nΑργότερα βρέθηκε ένα κομμάτι χαρτί στο οποίο ο Λούθερ είχε γράψει την τελευταία του δήλωση. Η δήλωση ήταν στα λατινικά, εκτός από το «Είμαστε ζητιάνοι», που ήταν στα γερμανικά.\n\nQuestion:Τι ανακαλύφθηκε αργότερα που γράφτηκε από τον Λούθερ;\n\nAnswer:"],
    ("th", "th"): ["พื้นหลัง:\n\nเลดีกากา ซึ่งชนะรางวัลแกรมมี หก รางวัล และได้เข้าชิงรางวัล อคาเดมี เป็นผู้ขับร้อง เพลงชาติ ในขณะที่ มาร์ลี แมตลิน ผู้ชนะรางวัลอคาเดมีเป็นผู้แปลให้เป็น ภาษามือแบบอเมริกัน\n\nคำถาม:เลดีกากา ชนะแกรมมีกี่รางวัล\n\nตอบ:",
                   "พื้นหลัง:\n\nกระดาษชิ้นหนึ่งถูกพบในภายหลังซึ่งลูเทอร์ได้เขียน คำพูดสุดท้ายของเขา ไว้ คำพูดนั้นเขียนเป็นภาษาละติน นอกเหนือจาก \"We are beggars,\" ซึ่งเขียนเป็นภาษาเยอรมัน\n\nคำถาม:อะไรคือสิ่งที่ถูกค้นพบในภายหลังที่เขียนโดยลูเทอร์?\n\nตอบ:"],
    ("th", "en"): ["Background:\n\nเลดีกากา ซึ่งชนะรางวัลแกรมมี หก รางวัล และได้เข้าชิงรางวัล อคาเดมี เป็นผู้ขับร้อง เพลงชาติ ในขณะที่ มาร์ลี แมตลิน ผู้ชนะรางวัลอคาเดมีเป็นผู้แปลให้เป็น ภาษามือแบบอเมริกัน\n\nQuestion:เลดีกากา ชนะแกรมมีกี่รางวัล\n\nAnswer:",
                   "Background:\n\nกระดาษชิ้นหนึ่งถูกพบในภายหลังซึ่งลูเทอร์ได้เขียน คำพูดสุดท้ายของเขา ไว้ คำพูดนั้นเขียนเป็นภาษาละติน นอกเหนือจาก \"We are beggars,\" ซึ่งเขียนเป็นภาษาเยอรมัน\n\nQuestion:อะไรคือสิ่งที่ถูกค้นพบในภายหลังที่เขียนโดยลูเทอร์?\n\nAnswer:"],
}


def _squad_file(tmp_path, records) -> str:
    paragraphs = [{"context": context, "qas": [{"id": qid, "question": question,
                                                "answers": [{"text": answer, "answer_start": context.find(answer)}]}]}
                  for qid, context, question, answer in records]
    path = tmp_path / "slice.json"
    path.write_text(json.dumps({"version": "1.0", "data": [{"title": "t", "paragraphs": paragraphs}]},
                               ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("lang, prompt_lang", sorted(EXPECTED_PROMPTS))
def test_evaluator_prompts_equal_the_fork_on_an_xquad_slice(tmp_path, lang, prompt_lang):
    config = qa.default_eval_config()
    config.update(lang=lang, prompt_lang=prompt_lang)
    examples, prompts = qa.build_prompts(squad.load_squad(_squad_file(tmp_path, XQUAD_SLICE[lang])), config)
    assert prompts == EXPECTED_PROMPTS[lang, prompt_lang]
    assert [ex.answers for ex in examples] == [(answer,) for *_, answer in XQUAD_SLICE[lang]]


TASKS_DIR = Path(squad.__file__).parent / "lm_eval_tasks"


class _TaskLoader(yaml.SafeLoader):
    """Reads the harness's `!function module.name` tags as plain strings."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _task_config(name: str) -> dict:
    """A task file merged over the file it includes, as lm-evaluation-harness 0.4 does."""
    config = yaml.load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"), Loader=_TaskLoader)
    base = yaml.load((TASKS_DIR / config.pop("include")).read_text(encoding="utf-8"), Loader=_TaskLoader)
    return {**base, **config}


def _load_by_path(path: Path):
    spec = importlib.util.spec_from_file_location("ogx_task_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lang, prompt_lang", sorted(EXPECTED_PROMPTS))
def test_lm_eval_task_files_render_the_fork_prompts(tmp_path, lang, prompt_lang):
    name = f"ogx_xquad_{'en' if prompt_lang == 'en' else ''}{lang}"
    config = _task_config(name)
    assert config["task"] == name and config["dataset_name"] == f"xquad.{lang}"
    assert config["output_type"] == "generate_until"
    assert config["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "max_gen_toks": 256}
    assert config["process_docs"] == "utils.flatten_squad" and config["process_results"] == "utils.process_results"

    # The documented local-file route: `dataset_path: json`, `field: data`, then process_docs.
    utils = _load_by_path(TASKS_DIR / "utils.py")
    raw = datasets.load_dataset("json", data_files=_squad_file(tmp_path, XQUAD_SLICE[lang]), field="data",
                                split="train", cache_dir=str(tmp_path / "cache"))
    docs = list(utils.flatten_squad(raw))
    template = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(
        config["doc_to_text"])
    assert [template.render(**doc) for doc in docs] == EXPECTED_PROMPTS[lang, prompt_lang]

    gold = docs[0]["answers"]["text"][0]
    assert utils.process_results(docs[0], [" " + gold]) == {"exact_match": 100.0, "f1": 100.0}
    assert utils.process_results(docs[0], ["nothing"]) == {"exact_match": 0.0, "f1": 0.0}


def test_mlqa_keeps_the_text_as_its_loader_does(tmp_path):
    # Hugging Face's `mlqa` loader does not strip; MLQA's template has a space after the label.
    config = qa.default_eval_config()
    config.update(lang="hi", prompt_style="mlqa")
    _, (prompt,) = qa.build_prompts(squad.load_squad(_squad_file(tmp_path, XQUAD_SLICE["hi"])), config)
    assert prompt == ("पृष्ठभूमि:\n\n एक कागज का टुकड़ा बाद में पाया गया जिसपर लूथर ने अपनाआखिरी कथन लिखा। यह कथन “हम याचक हैं” जो जर्मन में था,  के अतिरिक्त लैटिन में था।\n\n"
                      "सवाल: लूथर के द्वारा लिखा गया बाद में क्या खोजा गया? \n\nउत्तर:")


def test_defaults_are_the_harness_settings():
    config = qa.default_eval_config()
    assert (config.max_new_tokens, config.add_bos_token, config.shots, config.prompt_style) == (256, False, 0, "xquad")
    config.update(lang="th", prompt_style="mlqa")
    with pytest.raises(ValueError, match="--eval.lang='th'"):
        qa.check_eval_config(config)


def test_k_shot_demonstrations(xquad_hi):
    index = 5
    demos = squad.choose_demonstrations(xquad_hi, index, 3, seed=42)
    assert len(demos) == 3 and xquad_hi[index] not in demos and all(d in xquad_hi for d in demos)
    assert demos == squad.choose_demonstrations(xquad_hi, index, 3, seed=42)
    assert demos != squad.choose_demonstrations(xquad_hi, index, 3, seed=43)
    assert squad.choose_demonstrations(xquad_hi, index, 0, seed=42) == []
    labels = squad.prompt_labels("en")
    prompt = squad.build_prompt(xquad_hi[index], labels, demos)
    blocks = prompt.split("\n\nBackground:\n\n")
    assert len(blocks) == 4 and blocks[0].startswith("Background:")
    for demo, block in zip(demos, blocks):
        assert block.endswith(f"\n\nAnswer: {demo.answers[0]}")
    assert prompt.endswith(squad.question_block(xquad_hi[index], labels))
    # The test example is never its own demonstration, even when the pool is tiny.
    pair = xquad_hi[:2]
    assert squad.choose_demonstrations(pair, 0, 1, seed=0) == [pair[1]]
    with pytest.raises(ValueError, match="only 1 other"):
        squad.choose_demonstrations(pair, 0, 2, seed=0)


# ----------------------------------------------------------------------------------------------
# Greedy decoding with the cache
# ----------------------------------------------------------------------------------------------

def test_buckets_and_newline_pieces(tok):
    assert [bucket_length(n, 64, 1000) for n in (1, 64, 65, 300, 513, 999)] == [64, 64, 128, 512, 1000, 1000]
    assert NEWLINE_ID in newline_token_ids(tok)
    assert all("\n" in tok.decode([i]) for i in newline_token_ids(tok))


@pytest.fixture(scope="module")
def debug_model():
    """The demo LLaMA (vocab 4096, as the demo tokenizer) with random weights. A wide init makes
    logits far apart, so float noise between the two decoding paths cannot flip an argmax."""
    llama = model.build_model(model.get_llama_config("demo", '{"initializer_range": 0.2}'))
    # jitted: eager Flax init dispatches, and compiles, op by op
    params = jax.jit(lambda rng: model.init_params(llama, rng))(jax.random.PRNGKey(0))
    return llama, params


def _naive_greedy(forward, params, prompt, max_new, stop_ids, width=128):
    """Recomputes the whole sequence for every new token: no cache, no left padding.

    The sequence is right-padded to a fixed width only so that `forward` compiles once; causal
    attention keeps the real tokens blind to the padding after them.
    """
    ids, out = list(prompt), []
    for _ in range(max_new):
        row = np.zeros((1, width), np.int32)
        row[0, :len(ids)] = ids
        logits = forward(params, jnp.asarray(row))
        nxt = int(jnp.argmax(logits[0, len(ids) - 1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop_ids:
            break
    return out


def test_cached_greedy_equals_naive_recompute_with_left_padding(tok, debug_model):
    llama, params = debug_model
    params = jax.tree_util.tree_map(lambda x: x, params)  # a copy: the lm_head is edited below
    vocab = llama.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, n).tolist() for n in (3, 21, 50, 9, 33)]
    max_new = 10
    forward = jax.jit(lambda p, ids: llama.apply({"params": p}, ids).logits)

    # Make the newline piece win wherever a token from the middle of a greedy path would: its
    # lm_head column becomes a copy, and argmax breaks the tie towards the lower id.
    free_run = [_naive_greedy(forward, params, p, max_new, set()) for p in prompts]
    target = next(t for t in free_run[1][3:] if t > NEWLINE_ID)
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = kernel.at[:, NEWLINE_ID].set(kernel[:, target])

    mesh = make_mesh("1,-1,1")
    sharded = jax.device_put(params, param_shardings(params, mesh))
    decoder = GreedyDecoder(llama, tok, max_new_tokens=max_new, mesh=mesh, min_bucket=16)
    out = decoder.generate(sharded, prompts, batch_size=8)

    stop = set(decoder.stop_ids)
    assert NEWLINE_ID in stop and tok.eos_id in stop
    stopped_early = 0
    for prompt, ids, text in zip(prompts, out.token_ids, out.texts):
        reference = _naive_greedy(forward, params, prompt, max_new, stop)
        assert ids == reference
        stopped_early += len(ids) < max_new
        assert ids[-1] in stop or len(ids) == max_new
        assert isinstance(text, str) and "\n" not in text
        kept = ids[:-1] if ids[-1] == tok.eos_id else ids
        assert text == tok.decode(kept).split("\n")[0]
    assert stopped_early >= 1  # the newline rule was exercised

    # Same (batch, bucket): no new compilation; a longer prompt opens the next bucket.
    decoder.generate(sharded, prompts[2:4], batch_size=8)
    assert decoder.num_compilations == 1
    decoder.generate(sharded, [rng.integers(3, vocab, 70).tolist()], batch_size=8)
    assert decoder.num_compilations == 2


def test_over_long_prompt_keeps_its_last_window_minus_max_new_tokens(tok):
    # A 128-position model and 16 new tokens: a prompt may keep 112 tokens, as the harness's
    # context[-(max_length - max_gen_toks):]. The cut row must decode exactly as its last 112
    # tokens alone do in the uncached reference (which truncates nothing).
    llama = model.build_model(model.get_llama_config(
        "demo", '{"initializer_range": 0.2, "max_position_embeddings": 128}'))
    params = jax.jit(lambda rng: model.init_params(llama, rng))(jax.random.PRNGKey(1))
    decoder = GreedyDecoder(llama, tok, max_new_tokens=16, stop_at_newline=False, min_bucket=16)
    assert decoder.max_prompt_length == 112
    long_prompt = np.random.default_rng(1).integers(3, llama.config.vocab_size, 300).tolist()
    out = decoder.generate(params, [long_prompt], batch_size=1).token_ids[0]

    forward = jax.jit(lambda p, ids: llama.apply({"params": p}, ids).logits)
    stop = {tok.eos_id}
    assert out == _naive_greedy(forward, params, long_prompt[-112:], 16, stop)
    assert out != _naive_greedy(forward, params, long_prompt[-111:], 16, stop)  # the cut is exact


# ----------------------------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def debug_checkpoint(tmp_path_factory, debug_model):
    path = tmp_path_factory.mktemp("ckpt") / "params"
    checkpoint.save_params(path, debug_model[1])
    return path


def _flags(test_data, ckpt, tmp_path, **eval_overrides) -> ConfigDict:
    cfg = ConfigDict(evaluate.default_flags())
    cfg.load_checkpoint = f"params::{ckpt}"
    cfg.load_llama_config = "demo"
    cfg.update_llama_config = '{"max_position_embeddings": 256}'  # short prompts keep the test fast
    cfg.tokenizer.vocab_file = str(DEMO_TOKENIZER)
    cfg.eval.update(squad_file=str(test_data / "xquad" / "xquad.hi.json"), lang="hi", max_examples=8,
                    max_new_tokens=8, batch_size=8, output=str(tmp_path / "report.json"), **eval_overrides)
    return cfg


def test_evaluator_end_to_end_on_xquad_hi(test_data, debug_checkpoint, tmp_path):
    report = evaluate.run(_flags(test_data, debug_checkpoint, tmp_path, prompt_lang="en", shots=1))
    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == report

    agg = report["aggregate"]
    assert agg["task"] == "xquad_enhi" and agg["num_examples"] == 8 and agg["metric"] == "squad_v1"
    for key in ("exact_match", "f1", "multilingual_exact_match", "multilingual_f1"):
        assert 0.0 <= agg[key] <= 100.0
    assert agg["compilations"] == 1
    assert agg["truncated_prompts"] == 8  # Hindi contexts exceed 256 - 8 tokens; the end is kept
    assert report["config"]["lang"] == "hi" and report["config"]["load_llama_config"] == "demo"

    examples = squad.load_squad(test_data / "xquad" / "xquad.hi.json")
    assert [r["id"] for r in report["examples"]] == [ex.id for ex in examples[:8]]
    for record, ex in zip(report["examples"], examples):
        assert isinstance(record["prediction"], str) and "\n" not in record["prediction"]
        assert record["golds"] == list(ex.answers)
        assert record["prompt"].count("Background:") == 2 and record["prompt"].endswith("\n\nAnswer:")
        assert set(record) >= {"em", "f1", "multilingual_em", "multilingual_f1", "prompt_tokens", "truncated"}
        assert 0 < record["generated_tokens"] <= 8
    assert "xquad_enhi" in qa.format_table(report)


def test_cli_reports_bad_paths_in_one_line(test_data, debug_checkpoint, tmp_path):
    base = [sys.executable, "-m", "easylm_align.evaluate", "--load_llama_config=demo",
            f"--eval.squad_file={test_data / 'xquad' / 'xquad.hi.json'}", "--eval.lang=hi"]
    cases = {
        "no_such_dir": [f"--load_checkpoint=params::{tmp_path / 'no_such_dir'}",
                        f"--tokenizer.vocab_file={DEMO_TOKENIZER}"],
        "no_such.model": [f"--load_checkpoint=params::{debug_checkpoint}",
                          f"--tokenizer.vocab_file={tmp_path / 'no_such.model'}"],
    }
    for missing, args in cases.items():
        result = subprocess.run(base + args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and missing in lines[0]


def test_harness_utils_load_without_the_package_installed(tmp_path):
    """lm-eval loads utils.py by path in an environment that may not have easylm_align: block it."""
    code = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "easylm_align" or name.startswith("easylm_align."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("ogx_utils", {str(TASKS_DIR / "utils.py")!r})
utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(utils)
doc = dict(answers=dict(text=["Denver Broncos"]))
print(utils.process_results(doc, [" Denver Broncos"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'exact_match': 100.0" in out.stdout
