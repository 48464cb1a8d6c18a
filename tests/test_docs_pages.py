"""The README and the docs pages: links that resolve, a front door of bounded size, and
statements that match the code they describe."""
import glob
import os
import re

import torch

import provcollate as pc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _prose(text):
    """The text outside fenced code blocks, inline code spans kept as placeholders."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "code", text)


def _anchors(text):
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-', repeats numbered."""
    seen, anchors = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _section(text, heading):
    body = text.split(f"\n{heading}\n", 1)[1]
    return re.split(r"\n## ", body, maxsplit=1)[0]


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(_read(page))):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(ROOT, resolved)):
                broken.append(f"{page}: {target} (no file {resolved})")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(_read(resolved)):
                broken.append(f"{page}: {target} (no heading #{anchor} in {resolved})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_door():
    text = _read("README.md")
    assert len(text.splitlines()) <= 250
    two = _section(text, "## Two commands")
    assert "make demo" in two and "make test" in two
    # What the project is and does, not how it came to be: that belongs to CHANGELOG.md.
    for page in ["README.md"] + [p for p in PAGES if p.endswith(("guide.md", "integrations.md", "install.md"))]:
        history = re.findall(r"[Ii]ssue \d+|this session|previous (?:session|VM)|earlier VM|this VM", _read(page))
        assert not history, f"{page}: {history}"


def test_every_speed_row_has_one_link_into_the_results():
    rows = [line for line in _section(_read("README.md"), "## Speed").splitlines() if line.startswith("| `")]
    assert len(rows) >= 10
    for row in rows:
        assert len(re.findall(r"\]\(benchmarks/RESULTS\.md#[^)]+\)", row)) == 1, row


def test_limitations_state_the_collators_rule_as_the_code_applies_it():
    limitations = _section(_read("README.md"), "## Limitations")
    item = next(i for i in limitations.split("\n- ") if "`Collator`" in i)
    assert "per batch" not in item
    assert "never by the lengths one batch holds" in " ".join(item.split())
    assert "stack=" in item
    # The rule itself: a batch whose items have one length is still a padded sequence field with
    # lengths, and only stack= makes a field with a leading dimension stacked.
    same = [pc.Sample(i, 0, {"ids": torch.tensor([1, 2, 3]), "image": torch.ones(2, 2)}) for i in range(3)]
    batch = pc.Collator()(same)
    assert batch.lengths.tolist() == [3, 3, 3] and batch.mask.all()
    assert set(batch.field_lengths) == {"ids", "image"}
    stacked = pc.Collator(stack=["image"])(same)
    assert set(stacked.field_lengths) == {"ids"} and stacked["image"].shape == (3, 2, 2)
    packed = pc.Collator(packed=True, stack=["image"])(same)
    assert packed["ids"].shape == (9,) and packed["image"].shape == (3, 2, 2)
