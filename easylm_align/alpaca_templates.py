"""Stanford Alpaca prompt templates in English and our own translations (hi, el, th, zh).

COMMIT keeps the English template fixed and code-mixes only the instruction, input and
output ("block code-mix in template"), so a processor needs the template as literal text and
slots: :func:`template_parts` gives that split.

Every template here ends with ``"### Response:\\n"`` (or its translation plus a newline), so
the response starts on its own line. Stanford Alpaca's ``train.py`` (and the COMMIT code
copied from it) ends the prompt at ``"### Response:"`` with no newline; the README shows the
prompt with the line break.
"""

from __future__ import annotations

import string
from typing import NamedTuple

__all__ = ["ALPACA_TEMPLATES", "AlpacaTemplate", "get_alpaca_template", "template_parts"]


class AlpacaTemplate(NamedTuple):
    """The prompt for examples with a non-empty ``input`` and the one for those without."""

    with_input: str  # slots: {instruction}, {input}
    without_input: str  # slot: {instruction}


ALPACA_TEMPLATES: dict[str, AlpacaTemplate] = {
    "en": AlpacaTemplate(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
    "hi": AlpacaTemplate(
        with_input=(
            "नीचे एक निर्देश दिया गया है जो एक कार्य का वर्णन करता है, साथ में एक इनपुट है जो "
            "अतिरिक्त संदर्भ देता है। ऐसा उत्तर लिखिए जो अनुरोध को उचित रूप से पूरा करे।\n\n"
            "### निर्देश:\n{instruction}\n\n### इनपुट:\n{input}\n\n### उत्तर:\n"
        ),
        without_input=(
            "नीचे एक निर्देश दिया गया है जो एक कार्य का वर्णन करता है। "
            "ऐसा उत्तर लिखिए जो अनुरोध को उचित रूप से पूरा करे।\n\n"
            "### निर्देश:\n{instruction}\n\n### उत्तर:\n"
        ),
    ),
    "el": AlpacaTemplate(
        with_input=(
            "Ακολουθεί μια οδηγία που περιγράφει μια εργασία, μαζί με μια είσοδο που δίνει "
            "επιπλέον πλαίσιο. Γράψτε μια απάντηση που ολοκληρώνει κατάλληλα το αίτημα.\n\n"
            "### Οδηγία:\n{instruction}\n\n### Είσοδος:\n{input}\n\n### Απάντηση:\n"
        ),
        without_input=(
            "Ακολουθεί μια οδηγία που περιγράφει μια εργασία. "
            "Γράψτε μια απάντηση που ολοκληρώνει κατάλληλα το αίτημα.\n\n"
            "### Οδηγία:\n{instruction}\n\n### Απάντηση:\n"
        ),
    ),
    # Thai separates sentences with a space rather than a full stop.
    "th": AlpacaTemplate(
        with_input=(
            "ต่อไปนี้คือคำสั่งที่อธิบายงานหนึ่ง พร้อมด้วยข้อมูลนำเข้าที่ให้บริบทเพิ่มเติม "
            "จงเขียนคำตอบที่ทำตามคำขอได้อย่างเหมาะสม\n\n"
            "### คำสั่ง:\n{instruction}\n\n### ข้อมูลนำเข้า:\n{input}\n\n### คำตอบ:\n"
        ),
        without_input=(
            "ต่อไปนี้คือคำสั่งที่อธิบายงานหนึ่ง จงเขียนคำตอบที่ทำตามคำขอได้อย่างเหมาะสม\n\n"
            "### คำสั่ง:\n{instruction}\n\n### คำตอบ:\n"
        ),
    ),
    # Simplified Chinese with full-width punctuation.
    "zh": AlpacaTemplate(
        with_input=(
            "以下是一条描述任务的指令，并附有提供更多背景信息的输入。"
            "请写出一个恰当完成该请求的回答。\n\n"
            "### 指令：\n{instruction}\n\n### 输入：\n{input}\n\n### 回答：\n"
        ),
        without_input=(
            "以下是一条描述任务的指令。请写出一个恰当完成该请求的回答。\n\n"
            "### 指令：\n{instruction}\n\n### 回答：\n"
        ),
    ),
}


def get_alpaca_template(lang: str) -> AlpacaTemplate:
    """The Alpaca templates for ``lang`` (the ``alpaca_lang`` option)."""
    try:
        return ALPACA_TEMPLATES[lang]
    except KeyError:
        raise ValueError(
            f"unknown alpaca_lang {lang!r}; available: {', '.join(sorted(ALPACA_TEMPLATES))}"
        ) from None


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
            raise ValueError(f"template slot {{{slot}}} must be a plain name like {{instruction}}")
        parts.append((literal, slot))
    return parts
