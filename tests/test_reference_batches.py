"""Our batches against an independent re-implementation of COMMIT's data pipeline.

The reference is thnkinbtfly/COMMIT `EasyLM/data.py`, run with the seed commands' data settings
(its README's COMMIT section: `--tokenizer.add_bos_token=True --tokenizer.add_eos_token=True`,
`seq_length=512`, `batch_size=16`) and code-mixing off (naive Alpaca, naive CLM). Its documented
behaviour, re-implemented below with plain SentencePiece and never with our code:

* EasyLM's Hugging Face LLaMA tokenizer: `tokenizer(text) = [<s>] + sp.encode(text) + [</s>]`.
* Alpaca: source = Stanford Alpaca's prompt, ending at "### Response:" (no newline); target = the
  output; tokens = tokenizer(source + target); loss mask 0 on the first len(tokenizer(source))
  tokens, 1 after.
* `fields=text`: the processor's own [<s>] (mask 0), tokenizer(text) (mask 1 on all of it), the
  processor's own [</s>] (mask 1).
* Packing: all examples concatenated; while the buffer holds more than n + 1 tokens (n = batch ×
  seq): inputs buf[:n], targets buf[1:n+1], masks mask[1:n+1], each reshaped (batch, seq); then
  buf = buf[n:]. Positions 0..seq-1 in each row, causal attention across documents.
* Epochs: `HuggingfaceDataset.__iter__` starts every pass over the data set with empty buffers (the
  tokens after the last full batch are dropped); `JsonDataset` reads its file in an endless loop
  with one buffer (they start the next pass's first batch).

With `reference_token_stream=True` our batches equal the reference's; with the defaults they differ
exactly where `data.processors` documents (the Alpaca response's first token is trained; CLM rows
have one <s> and one </s>) and nowhere else.
"""

import hashlib
import json

import numpy as np
import pytest
import sentencepiece as spm

from conftest import REPO_ROOT
from easylm_align.data import pipeline
from easylm_align.alpaca_templates import ALPACA_TEMPLATES
from easylm_align.records import DataError
from easylm_align.tokenizer import ASSETS, Tokenizer

ALPACA_RECORDS = ASSETS / "alpaca_sample.json"
CLM_RECORDS = ASSETS / "demo_corpus.jsonl"
SEQ_LENGTH, BATCH_SIZE, BATCHES = 512, 16, 4

# Stanford Alpaca's prompt as COMMIT's data.py has it (`PROMPT_DICT`).
REFERENCE_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
REFERENCE_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")

# COMMIT's own translations (`lang_to_prompt_dict`): sha256 of (with input, without input) and the
# response header each ends with.
REFERENCE_TRANSLATIONS = {
    "hi": ("ef27e2426f8369337d1c9906cab13e5738ab9c7a51334e55ea831d8147e857b8",
           "0bb1855cfb74457e82ede74b16bbb5a75bc336b1df4754f671ee52ce7e615ee9", "### प्रतिक्रिया:"),
    "el": ("96124c001bc30396d8eaf2f117b449d4b7944b0abb45a03fd24aad43433932d3",
           "a39a2c5c1aa76047540f16ef31fe0c33fdae3c9417d012597edf21fe8afbf16c", "### Απάντηση:"),
    "th": ("1624a5b5e8b63f453373656ad7d6dc3bf6875b15efd6442001d2ac9516b93c2b",
           "c54ad7205703c82df0374ab666de80badd8cc49b87a686c23f5d0e65c93f7459", "### การตอบสนอง:"),
}


class ReferenceTokenizer:
    """EasyLM's LLaMA tokenizer with add_bos_token=add_eos_token=True, on plain SentencePiece."""

    def __init__(self, vocab_file):
        self.sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()

    def __call__(self, text: str) -> list[int]:
        return [self.bos] + self.sp.encode(text) + [self.eos]


def reference_alpaca(tokenizer: ReferenceTokenizer, example: dict) -> tuple[list[int], list[float]]:
    prompt = REFERENCE_PROMPT_INPUT if example.get("input", "") != "" else REFERENCE_PROMPT_NO_INPUT
    source = prompt.format_map(example)
    tokens = tokenizer(source + example["output"])
    untrained = len(tokenizer(source))
    return tokens, [0.0] * untrained + [1.0] * (len(tokens) - untrained)


def reference_clm(tokenizer: ReferenceTokenizer, example: dict) -> tuple[list[int], list[float]]:
    ids = tokenizer(example["text"])
    return [tokenizer.bos] + ids + [tokenizer.eos], [0.0] + [1.0] * len(ids) + [1.0]


def reference_batches(examples, batch_size: int = BATCH_SIZE, seq_length: int = SEQ_LENGTH,
                      count: int = BATCHES, epochs: int = 1, fresh_epochs: bool = False) -> list[dict]:
    """The first `count` batches over `epochs` passes over `examples`, each pass starting with empty
    buffers when `fresh_epochs` (HuggingfaceDataset), one buffer throughout otherwise (JsonDataset)."""
    examples = list(examples)
    n = batch_size * seq_length
    tokens, masks, batches = [], [], []
    for _ in range(epochs):
        if fresh_epochs:
            tokens, masks = [], []
        for ids, mask in examples:
            tokens.extend(ids)
            masks.extend(mask)
            while len(tokens) > n + 1:
                batches.append(dict(
                    input_tokens=np.array(tokens[:n], np.int32).reshape(batch_size, -1),
                    target_tokens=np.array(tokens[1:n + 1], np.int32).reshape(batch_size, -1),
                    loss_masks=np.array(masks[1:n + 1], np.float32).reshape(batch_size, -1)))
                if len(batches) == count:
                    return batches
                tokens, masks = tokens[n:], masks[n:]
    raise AssertionError(f"the records make only {len(batches)} batches")


def read_records(path):
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- our side -------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama2", "mistral-7b-v0.1"])
def vocab_file(request):
    if request.param == "llama2":  # Meta's licence: only in the shared data beside the checkout
        return request.getfixturevalue("shared_data") / "tokenizers" / "llama2" / "tokenizer.model"
    return REPO_ROOT / "tests" / "data" / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model"


def our_batches(vocab_file, records, count: int = BATCHES, **processor) -> list[dict]:
    cfg = pipeline.default_config("json")
    cfg.update_from_flattened_dict({
        "json_dataset.path": str(records), "json_dataset.seq_length": SEQ_LENGTH,
        "json_dataset.batch_size": BATCH_SIZE,
        **{f"text_processor.{k}": v for k, v in processor.items()}})
    tokenizer = Tokenizer(str(vocab_file), add_bos_token=True, add_eos_token=True)
    iterator = pipeline.DatasetIterator(cfg, tokenizer)
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("input_tokens", "target_tokens", "loss_masks"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {step}: {key}")
        # One causal stream per row, as the reference's model sees it.
        np.testing.assert_array_equal(a["segment_ids"], np.ones_like(a["segment_ids"]))
        seq_length = a["positions"].shape[1]
        np.testing.assert_array_equal(a["positions"], np.broadcast_to(np.arange(seq_length), a["positions"].shape))


# --- Alpaca ---------------------------------------------------------------------------------------

def test_alpaca_reference_token_stream_equals_the_reference(vocab_file):
    tokenizer = ReferenceTokenizer(vocab_file)
    theirs = reference_batches(reference_alpaca(tokenizer, ex) for ex in read_records(ALPACA_RECORDS))
    ours = our_batches(vocab_file, ALPACA_RECORDS, alpaca=True, reference_token_stream=True)
    assert_batches_equal(ours, theirs)


def test_alpaca_default_trains_the_first_response_token_and_nothing_else_changes(vocab_file):
    tokenizer = ReferenceTokenizer(vocab_file)
    reference, expected, flips, offset = [], [], [], 0
    for example in read_records(ALPACA_RECORDS):
        tokens, mask = reference_alpaca(tokenizer, example)
        reference.append((tokens, mask))
        first_response = mask.count(0.0) - 1  # the reference's last untrained position
        expected.append((tokens, mask[:first_response] + [1.0] + mask[first_response + 1:]))
        flips.append(offset + first_response)
        offset += len(tokens)
    ours = our_batches(vocab_file, ALPACA_RECORDS, alpaca=True)
    assert_batches_equal(ours, reference_batches(expected))
    # Against the reference's own batches: only those positions, each 0 -> 1.
    theirs = reference_batches(reference)
    difference = np.concatenate([(a["loss_masks"] - b["loss_masks"]).ravel() for a, b in zip(ours, theirs)])
    in_batches = [p - 1 for p in flips if 1 <= p <= BATCHES * BATCH_SIZE * SEQ_LENGTH]  # mask[1:n+1]
    assert np.flatnonzero(difference).tolist() == in_batches and (difference[in_batches] == 1).all()


# --- code-mixed CLM rows with code-mixing off (naive CLM) ------------------------------------------

def test_clm_reference_token_stream_equals_the_reference(vocab_file):
    tokenizer = ReferenceTokenizer(vocab_file)
    theirs = reference_batches(reference_clm(tokenizer, ex) for ex in read_records(CLM_RECORDS))
    ours = our_batches(vocab_file, CLM_RECORDS, fields="text", reference_token_stream=True)
    assert_batches_equal(ours, theirs)
    assert (theirs[0]["input_tokens"][0, :2] == tokenizer.bos).all()  # <s><s> opens the stream


def test_clm_default_has_one_bos_and_one_eos_and_nothing_else_changes(vocab_file):
    tokenizer = ReferenceTokenizer(vocab_file)
    expected = []
    for example in read_records(CLM_RECORDS):
        tokens, mask = reference_clm(tokenizer, example)
        assert tokens[:2] == [tokenizer.bos] * 2 and tokens[-2:] == [tokenizer.eos] * 2
        # Drop the tokenizer's own <s> (position 1) and </s> (second to last).
        expected.append((tokens[:1] + tokens[2:-2] + tokens[-1:], mask[:1] + mask[2:-2] + mask[-1:]))
    ours = our_batches(vocab_file, CLM_RECORDS, fields="text")
    assert_batches_equal(ours, reference_batches(expected))


# --- templates ------------------------------------------------------------------------------------

def test_english_templates_are_the_reference_prompt():
    assert ALPACA_TEMPLATES["en"] == (REFERENCE_PROMPT_INPUT, REFERENCE_PROMPT_NO_INPUT)


@pytest.mark.parametrize("lang", sorted(REFERENCE_TRANSLATIONS))
def test_translated_templates_are_the_reference_strings(lang):
    with_input, without_input, header = REFERENCE_TRANSLATIONS[lang]
    template = ALPACA_TEMPLATES[lang]
    assert template.with_input.endswith(header) and template.without_input.endswith(header)
    assert hashlib.sha256(template.with_input.encode()).hexdigest() == with_input
    assert hashlib.sha256(template.without_input.encode()).hexdigest() == without_input


# --- epoch boundaries -----------------------------------------------------------------------------

EPOCH_BATCH, EPOCH_SEQ, EPOCH_RECORDS = 2, 96, 3  # 4 batches an epoch, 106 tokens left over


def epoch_iterator(vocab_file, records, source, **flags):
    cfg = pipeline.default_config(source)
    cfg.update_from_flattened_dict({
        "json_dataset.path": str(records), "huggingface_dataset.path": "json",
        "huggingface_dataset.data_files": str(records),
        **{f"{group}.{key}": value for group in ("json_dataset", "huggingface_dataset")
           for key, value in (("seq_length", EPOCH_SEQ), ("batch_size", EPOCH_BATCH))},
        "text_processor.fields": "text", "text_processor.reference_token_stream": True, **flags})
    return pipeline.DatasetIterator(cfg, Tokenizer(str(vocab_file), add_bos_token=True, add_eos_token=True))


@pytest.fixture(scope="module")
def few_records(tmp_path_factory):
    path = tmp_path_factory.mktemp("epochs") / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in read_records(CLM_RECORDS)[:EPOCH_RECORDS]),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("source,epoch_tail,fresh", [("huggingface", "auto", True), ("json", "auto", False),
                                                     ("huggingface", "carry", False), ("json", "drop", True)])
def test_epoch_boundaries_are_the_references(few_records, source, epoch_tail, fresh):
    """Over three passes of a data set of a few records: the Hugging Face source starts every epoch
    afresh and the JSON source carries its tail, as the reference's two classes; each is a flag away
    from the other. A checkpoint taken after any batch resumes to the same next batch."""
    vocab_file = REPO_ROOT / "tests" / "data" / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model"
    tokenizer = ReferenceTokenizer(vocab_file)
    examples = [reference_clm(tokenizer, ex) for ex in read_records(few_records)]
    per_epoch = (sum(len(ids) for ids, _ in examples) - 2) // (EPOCH_BATCH * EPOCH_SEQ)
    count = 3 * per_epoch
    theirs = reference_batches(examples, EPOCH_BATCH, EPOCH_SEQ, count, epochs=3, fresh_epochs=fresh)
    iterator = epoch_iterator(vocab_file, few_records, source, epoch_tail=epoch_tail)
    ours, states = [], []
    for _ in range(count):
        ours.append(next(iterator))
        states.append(iterator.state_dict())
    assert_batches_equal(ours, theirs)
    assert iterator.epoch == 2
    if fresh:  # every epoch begins with the data set's first tokens
        for epoch in range(3):
            np.testing.assert_array_equal(ours[epoch * per_epoch]["input_tokens"], theirs[0]["input_tokens"])
    else:
        assert not np.array_equal(ours[per_epoch]["input_tokens"], ours[0]["input_tokens"])
    for step in range(count - 1):  # exact resume, across the boundaries too
        resumed = epoch_iterator(vocab_file, few_records, source, epoch_tail=epoch_tail)
        resumed.load_state_dict(states[step])
        np.testing.assert_array_equal(next(resumed)["input_tokens"], ours[step + 1]["input_tokens"])


def test_an_epoch_too_small_for_a_batch_is_refused_when_epochs_start_afresh(few_records):
    vocab_file = REPO_ROOT / "tests" / "data" / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model"
    iterator = epoch_iterator(vocab_file, few_records, "huggingface",
                              **{"huggingface_dataset.batch_size": 64})
    with pytest.raises(DataError, match=r"one epoch of the data set makes no batch .* 64 x 96 .*"
                                        r"--train_dataset.epoch_tail=carry"):
        next(iterator)
    carried = epoch_iterator(vocab_file, few_records, "huggingface", epoch_tail="carry",
                             **{"huggingface_dataset.batch_size": 64})
    assert next(carried)["input_tokens"].shape == (64, EPOCH_SEQ)
    with pytest.raises(DataError, match="--train_dataset.epoch_tail='first': choose auto"):
        epoch_iterator(vocab_file, few_records, "json", epoch_tail="first")
