"""Run the ``>>>`` examples inside the ```python blocks of a Markdown page as doctests.

Usage: python run_doc_examples.py PAGE.md  (exit status 1 on any failure).
Code fences are not part of the expected output, so pages need no blank line
before a closing fence.
"""
import doctest
import re
import sys

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def main(path):
    text = open(path, encoding="utf-8").read()
    blocks = [m.group(1) for m in FENCE.finditer(text)]
    source = "\n\n".join(blocks)
    parser = doctest.DocTestParser()
    test = parser.get_doctest(source, {"__name__": "__doc_examples__"}, path, path, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    print(f"{path}: {attempted} examples, {failed} failed")
    return 1 if failed or not attempted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
