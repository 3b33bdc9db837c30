#!/usr/bin/env python3
"""infra/local/check_pipes.py [FILE-OR-DIRECTORY...]: no pipeline under
pipefail ends in a reader that exits early. Run by infra/local/test.

Under `set -o pipefail` a pipeline fails when any of its commands fails, and
a reader that stops before its input ends (`grep -q`, `grep -m N`, `head`)
kills its writer with SIGPIPE (status 141) if the writer is still writing: a
race, so `rpm -qlp X | grep -qx /usr/bin/fleetsync || fail` fails at random
although the file is there. Capture the output first, then match it
(`files=$(rpm -qlp X) || fail ...`, then `grep -qx F <<<"$files"`), or read
it all (`sed -n 1p`, not `head -1`).

Reported, in every pipeline (in `$(...)`, backticks, functions, conditions):
a `grep` with -q/--quiet/--silent/-m/--max-count/-l/-L (-qx, -m1...) or a
`head` that is not the first command, whether last or followed by more (its
writer dies the same way). A here-string (`grep -q X <<<"$v"`) is no pipe.

Scanned, unless FILEs or DIRECTORYs are given: the shell scripts under infra/
and .ci/ (a bash or sh shebang, a `# shellcheck shell=` first line, or a name
ending .sh) that turn on pipefail or that such a script sources (lib.sh), and
the YAML literal blocks (`|`) there that turn it on (fleetsync.yaml's).

A small lexer, not a parser: it knows what hides a `|` that is no pipe
(quotes, comments, here-document bodies, `[[ ]]`, `case` patterns), lexes
`$(...)`, backticks and `(...)` (subshells, arithmetic, arrays) as command
lists of their own, ends pipelines at `;`, `&`, `&&`, `||` and newlines, and
reports what it cannot lex (an unclosed quote, `(` or here-document, a stray
`)`). Not understood (no script has one): substitutions in an unquoted
here-document (skipped like any body), `<<` in arithmetic over more than one
line (read as a here-document), other readers that stop early (`sed 1q`).
"""

import os
import re
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP_DIRS = {".git", "__pycache__", "target", "node_modules"}
# A YAML literal block: its lines are those after it, blank or indented more.
YAML_BLOCK = re.compile(r"^( *)(?:- +|[^#\n]*: +)?[|][-+0-9]*[ \t]*(?:#.*)?\n((?:\1 +\S.*(?:\n|\Z)|[ \t]*\n)*)", re.M)
SHELL = re.compile(r"#!\s*\S*/(?:env\s+(?:-\S+\s+)*)?(?:ba)?sh\b|#\s*shellcheck\s+shell=(?:ba)?sh\b")

BLANKS = re.compile(r"(?:[ \t]+|\\\n|#[^\n]*)*")  # and comments: the lexer meets `#` only where a word starts
OPERATOR = re.compile(r"[<>]\(|;;&|;;|;&|&&|\|\||\|&|&>>?|<<<|<<-?|<>|[<>]&|>>|>\||[|;&()<>]|")  # "" if none
REDIRECTIONS = {"&>", "&>>", "<<<", "<<", "<<-", "<>", "<&", ">&", ">>", ">|", "<", ">"}
WORD_END = set(" \t\n;&|()<>")
QUOTED = re.compile(r"'[^']*'|\$'(?:[^'\\]|\\.)*'", re.S)  # '...' and $'...'
BACKTICKS = re.compile(r"`(?:[^`\\]|\\.)*`", re.S)
QUOTING = re.compile(r"""['"\\]""")  # removed from a word, leave its text (near enough)
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=")
PREFIXES = {"!", "{", "}", "if", "then", "elif", "else", "fi", "while", "until", "do", "done", "time",
            "command", "builtin", "exec", "nohup"}  # words before a command's name
# grep stops reading at the first match (-q, -l, -L) or the Nth (-m N).
EARLY_GREP_LONG = ("quiet", "silent", "max-count", "files-with-matches", "files-without-match")
GREP_LONG_WITH_VALUE = {"regexp", "file", "after-context", "before-context", "context"}


def early_reader(words):
    """`grep -q`-like text if words (a command's) make a reader that may exit early, else None."""
    name, args = os.path.basename(QUOTING.sub("", words[0])), [QUOTING.sub("", w) for w in words[1:]]
    if name == "head":
        return " ".join([name] + args)
    args = args[:args.index("--")] if "--" in args else args
    early = takes_value = False
    for a in args if name in ("grep", "egrep", "fgrep") else ():
        if takes_value:  # the value of -e, -f, -m, -A...: `grep -e -q` has no -q
            takes_value = False
        elif a.startswith("--"):
            long = a[2:].split("=", 1)[0]
            early |= bool(long) and any(full.startswith(long) for full in EARLY_GREP_LONG)
            takes_value = long in GREP_LONG_WITH_VALUE and "=" not in a
        elif a.startswith("-") and a != "-":  # -qx; -m1, -m 1 and -e PATTERN take a value
            flags, option, value = re.match(r"-([^ABCDdefm]*)([ABCDdefm]?)(.*)", a).groups()
            early |= bool(set(flags) & set("qlL")) or option == "m"
            takes_value = bool(option) and not value
    return " ".join([name] + [a for a in args if a.startswith("-") and a != "-"]) if early else None


class ParseError(Exception):
    """(line, message)"""


class Shell:
    """Lexes one shell text; commands() checks each pipeline where it ends, collecting
    findings [(line, message)], pipefail (turned on?) and sources (basenames sourced)."""

    def __init__(self, src, first_line=1):
        self.src, self.i, self.first_line = src, 0, first_line
        self.findings, self.pipefail, self.sources = [], False, set()

    def line(self, i=None):
        return self.first_line + self.src.count("\n", 0, self.i if i is None else i)

    def error(self, message, at=None):
        raise ParseError(self.line(at), message)

    def commands(self, closer=False):
        """Lexes commands to the end of the text or (closer) past the `)` of a `$(`, `(` or `<(`."""
        src, opened = self.src, self.i
        pipeline, words = [], []  # the commands before the last `|`; this one's [(line, word)]
        in_pattern, heredocs = False, []  # in a case pattern; here-documents to skip at the next newline

        def end_pipeline():
            nonlocal pipeline, words
            self.check(pipeline + [words])
            pipeline, words = [], []

        while True:
            self.i = BLANKS.match(src, self.i).end()
            first = words[0][1] if words else None
            in_test = first == "[[" and words[-1][1] != "]]"
            c, op = src[self.i:self.i + 1], OPERATOR.match(src, self.i).group()
            if not c:
                if closer:
                    self.error("no ) closes this (", opened)
                return end_pipeline()
            elif c == "\n":
                self.i += 1
                for last_line in heredocs:  # skip their bodies
                    self.i = (last_line.search(src, self.i) or self.error("a here-document has no end")).end() + 1
                heredocs = []
                if not in_test and first != "case" and (words or not pipeline):  # `a |`, `case x`: goes on
                    end_pipeline()
            elif op and (in_test or in_pattern):  # [[ $x =~ (a|b) ]], case patterns a|b): no operators
                self.i += len(op)
                in_pattern = in_pattern and op != ")"  # the `)` ends a pattern
            elif op == ")":
                if not closer:
                    self.error("unexpected )")
                self.i += 1
                return end_pipeline()
            elif op in ("(", "<(", ">("):  # a subshell (or arithmetic, an array, a function's ()), <(...)
                end_pipeline()
                self.i += len(op)
                self.commands(closer=True)
            elif op in ("|", "|&"):
                self.i += len(op)
                pipeline, words = pipeline + [words], []
            elif op in REDIRECTIONS:  # its target is no word of the command
                self.i = BLANKS.match(src, self.i + len(op)).end()
                target = self.word()  # none before a <(...), lexed next
                if op in ("<<", "<<-"):  # the body ends at a line holding just the delimiter
                    tabs = "\t*" if op == "<<-" else ""
                    heredocs.append(re.compile(f"^{tabs}{re.escape(QUOTING.sub('', target))}$", re.M))
            elif op:  # ; & && || ;; ;& ;;&
                self.i += len(op)
                end_pipeline()
                in_pattern = op in (";;", ";&", ";;&")
            else:
                line, word = self.line(), self.word()
                if word.isdigit() and src[self.i:self.i + 1] in ("<", ">"):
                    continue  # the 2 of 2>/dev/null
                if in_pattern:
                    in_pattern = word != "esac"
                elif words or not (word in PREFIXES or ASSIGNMENT.match(word)):
                    words.append((line, word))
                    if first == "function" or first == "case" and word == "in":  # `function f`, `case x in`
                        end_pipeline()
                        in_pattern = word == "in"

    def word(self):
        """One word from self.i; the commands in its substitutions are lexed."""
        src, start, braces, in_quotes = self.src, self.i, 0, False
        while self.i < len(src) and (in_quotes or braces or src[self.i] not in WORD_END):
            c = src[self.i]
            if c == '"':
                in_quotes = not in_quotes
                self.i += 1
            elif not in_quotes and (c == "'" or src.startswith("$'", self.i)):
                self.i = (QUOTED.match(src, self.i) or self.error("no ' closes this '")).end()
            elif src.startswith("$(", self.i):
                self.i += 2
                self.commands(closer=True)
            elif c == "`":
                quoted = BACKTICKS.match(src, self.i) or self.error("no ` closes this `")
                self.findings += scan(re.sub(r"\\([\\`$])", r"\1", quoted.group()[1:-1]), self.line())[0]
                self.i = quoted.end()
            else:
                if src.startswith("${", self.i):  # ${x:- a b} is one word
                    braces += 1
                elif c == "}" and braces:
                    braces -= 1
                self.i += 2 if c == "\\" else 1
        if in_quotes:
            self.error('no " closes this "', start)
        return src[start:self.i]

    def check(self, pipeline):
        for n, command in enumerate(pipeline):
            words = [word for _, word in command]
            self.pipefail |= words[:1] == ["set"] and any(a.startswith("-") and a.endswith("o") and b == "pipefail"
                                                          for a, b in zip(words[1:], words[2:]))
            if words[:1] in (["source"], ["."]) and len(words) > 1:
                self.sources.add(os.path.basename(QUOTING.sub("", words[1])))
            reader = n > 0 and words and early_reader(words)
            if reader:
                where = "ends in" if n == len(pipeline) - 1 else "has, before its last command,"
                self.findings.append((command[0][0], f"pipeline {where} '{reader}' under pipefail: "
                                                     "capture the output first, then match"))


def scan(text, first_line=1):
    """(findings [(line, message)], turns on pipefail, basenames it sources)."""
    shell = Shell(text, first_line)
    try:
        shell.commands()
    except ParseError as e:
        shell.findings.append((e.args[0], f"cannot parse the shell ({e.args[1]}): check_pipes.py cannot vouch for it"))
        shell.pipefail = "pipefail" in text  # reported if it may turn it on
    return shell.findings, shell.pipefail, shell.sources


def scripts(paths):
    """(path, text, its first line) of each shell script and YAML literal block."""
    for top in paths:
        if not os.path.exists(top):
            sys.exit(f"check_pipes: no such file or directory: {top}")
        for d, dirs, names in os.walk(top) if os.path.isdir(top) else [("", [], [top])]:  # a file: itself
            dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
            for path in (os.path.join(d, name) for name in sorted(names)):
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if path.endswith((".yaml", ".yml")):
                    for block in YAML_BLOCK.finditer(text):
                        yield path, textwrap.dedent(block.group(2)), text.count("\n", 0, block.start(2)) + 1
                elif path.endswith(".sh") or SHELL.match(text.split("\n", 1)[0]):
                    yield path, text, 1


def main(argv):
    if any(a.startswith("-") for a in argv):
        sys.exit("usage: infra/local/check_pipes.py [FILE-OR-DIRECTORY...]")
    paths = argv or [os.path.join(ROOT, d) for d in ("infra", ".ci")]
    shown = os.path.normpath if argv else lambda p: os.path.relpath(p, ROOT)
    scanned = [(path,) + scan(text, first) for path, text, first in scripts(paths)]
    sourced = set().union(*(sources for _, _, pipefail, sources in scanned if pipefail))
    checked = [(path, found) for path, found, pipefail, _ in scanned if pipefail or os.path.basename(path) in sourced]
    findings = sorted((shown(path), line, message) for path, found in checked for line, message in found)
    for path, line, message in findings:
        print(f"{path}:{line}: {message}")
    if not findings:
        print(f"check_pipes: {len(checked)} scripts, no early-exit readers at the end of a pipeline")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
