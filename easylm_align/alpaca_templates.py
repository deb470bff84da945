"""Alpaca prompt templates: the reference's strings for en, hi, el and th, and ours for zh.

Where they come from. ``en`` is Stanford Alpaca's prompt (``PROMPT_DICT`` in tatsu-lab/stanford_alpaca
``train.py``), which COMMIT's ``EasyLM/data.py`` (thnkinbtfly/COMMIT) uses; ``hi``, ``el`` and ``th``
are COMMIT's own translations there (``lang_to_prompt_dict``), reproduced character for character:
they are part of the data the paper trained on. ``zh`` is ours (the reference has no Chinese),
laid out the same way. The reference's other languages (ht, qu, te, sw, ta, ur, my, bn) are not
included.

Every template ends at the response header with no newline (``"### Response:"``), as in the
reference: the Alpaca processor appends the output directly and tokenizes prompt and output as
one string, so the tokens at the seam are the reference's.

COMMIT keeps the template fixed and code-mixes only the instruction, input and output ("block
code-mix in template"), so a processor needs the template as literal text and slots:
:func:`template_parts` gives that split.
"""

from __future__ import annotations

import string
from typing import NamedTuple

from easylm_align.errors import ConfigError

__all__ = ["ALPACA_TEMPLATES", "AlpacaTemplate", "get_alpaca_template", "template_parts"]


class AlpacaTemplate(NamedTuple):
    """The prompt for examples with a non-empty ``input`` and the one for those without."""

    with_input: str  # slots: {instruction}, {input}
    without_input: str  # slot: {instruction}


ALPACA_TEMPLATES: dict[str, AlpacaTemplate] = {
    "en": AlpacaTemplate(
        with_input=(
            "Below is an instruction that describes a task, "
            "paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n"
            "### Input:\n{input}\n\n"
            "### Response:"
        ),
        without_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n"
            "### Response:"
        ),
    ),
    "hi": AlpacaTemplate(
        with_input=(
            "नीचे एक निर्देश है जो किसी कार्य का वर्णन करता है, "
            "जिसे एक इनपुट के साथ जोड़ा गया है जो आगे का संदर्भ प्रदान करता है। "
            "ऐसा उत्तर लिखें जो अनुरोध को उचित रूप से पूरा करता हो।\n\n"
            "### निर्देश:\n{instruction}\n\n"
            "### इनपुट:\n{input}\n\n"
            "### प्रतिक्रिया:"
        ),
        without_input=(
            "नीचे एक निर्देश है जो किसी कार्य का वर्णन करता है। "
            "ऐसा उत्तर लिखें जो अनुरोध को उचित रूप से पूरा करता हो।\n\n"
            "### निर्देश:\n{instruction}\n\n"
            "### प्रतिक्रिया:"
        ),
    ),
    "el": AlpacaTemplate(
        with_input=(
            "Παρακάτω είναι μια οδηγία που περιγράφει μια εργασία, "
            "σε συνδυασμό με μια είσοδο που παρέχει περαιτέρω πλαίσιο. "
            "Γράψτε μια απάντηση που ολοκληρώνει κατάλληλα το αίτημα.\n\n"
            "### Οδηγία:\n{instruction}\n\n"
            "### Εισαγωγή:\n{input}\n\n"
            "### Απάντηση:"
        ),
        without_input=(
            "Παρακάτω είναι μια οδηγία που περιγράφει μια εργασία. "
            "Γράψτε μια απάντηση που ολοκληρώνει κατάλληλα το αίτημα.\n\n"
            "### Οδηγία:\n{instruction}\n\n"
            "### Απάντηση:"
        ),
    ),
    # Thai separates sentences with a space rather than a full stop.
    "th": AlpacaTemplate(
        with_input=(
            "ด้านล่างนี้คือคำสั่งที่อธิบายงาน ควบคู่ไปกับอินพุตที่ให้บริบทเพิ่มเติม "
            "เขียนคำตอบที่ตอบสนองคำขอได้อย่างเหมาะสม\n\n"
            "### คำแนะนำ:\n{instruction}\n\n"
            "### ป้อนข้อมูล:\n{input}\n\n"
            "### การตอบสนอง:"
        ),
        without_input=(
            "ด้านล่างนี้เป็นคำแนะนำที่อธิบายงาน เขียนคำตอบที่ตอบสนองคำขอได้อย่างเหมาะสม\n\n"
            "### คำแนะนำ:\n{instruction}\n\n"
            "### การตอบสนอง:"
        ),
    ),
    # Ours (the reference has no Chinese): simplified Chinese, full-width colons, same layout.
    "zh": AlpacaTemplate(
        with_input=(
            "以下是一条描述任务的指令，并附有提供更多背景信息的输入。请写出一个恰当完成该请求的回答。\n\n"
            "### 指令：\n{instruction}\n\n"
            "### 输入：\n{input}\n\n"
            "### 回答："
        ),
        without_input=(
            "以下是一条描述任务的指令。请写出一个恰当完成该请求的回答。\n\n"
            "### 指令：\n{instruction}\n\n"
            "### 回答："
        ),
    ),
}


def get_alpaca_template(lang: str) -> AlpacaTemplate:
    """The Alpaca templates for ``lang`` (the ``alpaca_lang`` option)."""
    if lang not in ALPACA_TEMPLATES:
        raise ConfigError(f"unknown alpaca_lang {lang!r}; available: {', '.join(sorted(ALPACA_TEMPLATES))}")
    return ALPACA_TEMPLATES[lang]


def template_parts(template: str) -> list[tuple[str, str | None]]:
    """Splits a template into ``(literal, slot)`` pairs, in order.

    Each pair is the fixed text before a slot and that slot's name; the last pair's slot is
    ``None`` when fixed text follows the last slot. Joining every literal with the slot values
    in between reproduces ``template.format(**values)``, so a processor can code-mix the slot
    values alone and leave the template's own words untouched.
    """
    parts: list[tuple[str, str | None]] = []
    for literal, slot, spec, conversion in string.Formatter().parse(template):
        if slot is not None and (not slot.isidentifier() or spec or conversion):
            raise ConfigError(f"template slot {{{slot}}} must be a plain name like {{instruction}}")
        parts.append((literal, slot))
    return parts
