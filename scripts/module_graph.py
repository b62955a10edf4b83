#!/usr/bin/env python3
"""Module import graph, cycles, line counts and largest functions of the `diffuse` crate.

Standard library only; reads the sources, never builds anything.

Nodes: each top-level library module `X` (src/X.rs or src/X/mod.rs); for a directory module
also each file src/X/Y.rs as `X::Y`. src/kernels/* is one node `kernels`. The binary
(src/main.rs, src/cli/*.rs) only appears in the line counts and the function list.

Edges: a file of node A names a path that resolves to node B != A:
  * `crate::B...` anywhere in code (including every leaf of `use crate::{a, b::{c, d}}` groups),
  * `super::Y...` / `self::Y...` resolved from the file's module (so `super::sigmas` in
    sampler/euler.rs is `sampler::sigmas`),
  * `crate::X::Item` where X/mod.rs has `pub use child::Item` resolves to `X::child`
    (turn off with --no-reexports).
Comments (//, //!, ///, /* */), string and char literals are blanked before scanning.
Edges between a directory module's mod.rs node `X` and its own children `X::Y` (either way)
are left out by default, since mod.rs/child references are everywhere and would make every
directory one cycle; --with-parent-edges keeps them and also adds mod.rs's bare `child::`
paths. Sibling edges (`X::Y` -> `X::Z`) are always kept.

Usage: scripts/module_graph.py [--root DIR] [--rev GITREV] [--json OUT] [--top N]
"""

import argparse
import bisect
import json
import os
import re
import subprocess
import sys
from collections import defaultdict, deque

IDENT_RE = re.compile(r"(?:r#)?[A-Za-z_][A-Za-z0-9_]*")
RAW_STR_RE = re.compile(r'b?r(#*)"')
PATH_START_RE = re.compile(r"(?<![A-Za-z0-9_:])\$?(crate|super|self)\s*::")
PUB_USE_RE = re.compile(r"(?<![A-Za-z0-9_])pub(?:\s*\([^)]*\))?\s+use\s+")
FN_RE = re.compile(r"(?<![A-Za-z0-9_$])fn\s+((?:r#)?[A-Za-z_][A-Za-z0-9_]*)")
IMPL_RE = re.compile(r"(?m)^[ \t]*(?:unsafe[ \t]+)?impl\b")
TRAIT_RE = re.compile(r"(?m)^[ \t]*(?:pub(?:\([^)]*\))?[ \t]+)?(?:unsafe[ \t]+)?trait[ \t]+([A-Za-z_]\w*)")
LIB_MOD_RE = re.compile(r"(?m)^[ \t]*(?:pub(?:\([^)]*\))?[ \t]+)?mod[ \t]+([A-Za-z_]\w*)[ \t]*;")
BIN_MOD_RE = re.compile(r"(?m)^[ \t]*(?:pub(?:\([^)]*\))?[ \t]+)?mod[ \t]+([A-Za-z_]\w*)[ \t]*[;{]")


# ---------------------------------------------------------------------------------------------
# Sources


def read_worktree(root):
    files = {}
    src = os.path.join(root, "src")
    for d, _, names in os.walk(src):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(d, n)
                rel = os.path.relpath(p, root).replace(os.sep, "/")
                with open(p, encoding="utf-8", errors="replace") as f:
                    files[rel] = f.read()
    return files


def read_git(root, rev):
    git = ["git", "--no-optional-locks", "-C", root]
    names = subprocess.run(git + ["ls-tree", "-r", "--name-only", rev, "--", "src"],
                           check=True, capture_output=True, text=True).stdout.split()
    files = {}
    for rel in names:
        if rel.endswith(".rs"):
            files[rel] = subprocess.run(git + ["show", f"{rev}:{rel}"], check=True,
                                        capture_output=True).stdout.decode("utf-8", "replace")
    return files


# ---------------------------------------------------------------------------------------------
# Lexing: blank comments (and optionally string/char literals), keeping offsets and newlines


def sanitize(src, blank_strings=True):
    out = list(src)
    n = len(src)

    def blank(a, b):
        for k in range(a, min(b, n)):
            if out[k] != "\n":
                out[k] = " "

    i = 0
    while i < n:
        c = src[i]
        nxt = src[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
            continue
        if c == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
            continue
        if c in "rb" and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = RAW_STR_RE.match(src, i)
            if m:
                close = '"' + m.group(1)
                j = src.find(close, m.end())
                j = n if j < 0 else j
                if blank_strings:
                    blank(m.end(), j)
                i = j + len(close)
                continue
        if c == '"':
            j = i + 1
            while j < n:
                if src[j] == "\\":
                    j += 2
                    continue
                if src[j] == '"':
                    break
                j += 1
            if blank_strings:
                blank(i + 1, j)
            i = j + 1
            continue
        if c == "'":
            if nxt == "\\":  # escaped char literal: '\n', '\'', '\u{..}'
                j = src.find("'", i + 3)
                j = n if j < 0 else j
                if blank_strings:
                    blank(i + 1, j)
                i = j + 1
                continue
            if i + 2 < n and src[i + 2] == "'" and nxt != "\n":  # 'x', '{', '"'
                if blank_strings:
                    blank(i + 1, i + 2)
                i += 3
                continue
            i += 1  # lifetime or label
            continue
        i += 1
    return "".join(out)


class LineIndex:
    def __init__(self, text):
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line(self, pos):
        return bisect.bisect_right(self.starts, pos)


def skip_ws(s, i):
    n = len(s)
    while i < n and s[i].isspace():
        i += 1
    return i


def parse_tree(s, i, prefix=()):
    """Parse a path / use-tree at s[i:]; return ([(segments, alias, pos)], end)."""
    segs = list(prefix)
    start = i
    leaves = []
    n = len(s)
    first = True
    while True:
        i = skip_ws(s, i)
        if i < n and s[i] == "{" and not first:
            i += 1
            while True:
                i = skip_ws(s, i)
                if i >= n:
                    return leaves, i
                if s[i] == "}":
                    return leaves, i + 1
                sub, i = parse_tree(s, i, segs)
                leaves += sub
                i = skip_ws(s, i)
                if i < n and s[i] == ",":
                    i += 1
                elif i < n and s[i] == "}":
                    return leaves, i + 1
                else:
                    return leaves, i
        if i < n and s[i] == "*" and not first:
            leaves.append((segs + ["*"], None, start))
            return leaves, i + 1
        if i < n and s[i] == "$":  # $crate
            i += 1
        m = IDENT_RE.match(s, i)
        if not m:
            break
        segs.append(m.group().removeprefix("r#"))
        i = m.end()
        first = False
        j = skip_ws(s, i)
        if s.startswith("::", j):
            k = skip_ws(s, j + 2)
            if k < n and s[k] == "<":  # turbofish ends the module path
                break
            i = k
            continue
        break
    if len(segs) == len(prefix):
        return leaves, i
    alias = None
    j = skip_ws(s, i)
    m = IDENT_RE.match(s, j)
    if m and m.group() == "as":
        m2 = IDENT_RE.match(s, skip_ws(s, m.end()))
        if m2:
            alias = m2.group()
            i = m2.end()
    leaves.append((segs, alias, start))
    return leaves, i


# ---------------------------------------------------------------------------------------------
# Crate layout


class Layout:
    def __init__(self, files):
        self.files = files
        lib = files.get("src/lib.rs", "")
        declared = set(LIB_MOD_RE.findall(sanitize(lib))) if lib else set()
        main = files.get("src/main.rs", "")
        bin_mods = set(BIN_MOD_RE.findall(sanitize(main))) if main else set()
        tops = set()
        for rel in files:
            parts = rel.split("/")
            if len(parts) == 2 and parts[1] not in ("lib.rs", "main.rs"):
                tops.add(parts[1][:-3])
            elif len(parts) >= 3:
                tops.add(parts[1])
        # library modules: all of src/ except main.rs and what main.rs declares (`mod cli;`);
        # those lib.rs does not declare (a refactor under way) are still nodes, but flagged
        self.lib_mods = sorted(t for t in tops if t in declared or t not in bin_mods)
        self.undeclared = sorted(t for t in self.lib_mods if t not in declared)
        self.dir_mods = sorted(t for t in self.lib_mods
                               if any(r.startswith(f"src/{t}/") for r in files))
        self.children = defaultdict(set)
        for rel in files:
            parts = rel.split("/")
            if len(parts) >= 3 and parts[1] in self.dir_mods:
                child = parts[2][:-3] if len(parts) == 3 else parts[2]
                if child != "mod":
                    self.children[parts[1]].add(child)

    def classify(self, rel):
        """('lib', node, module_path) | ('bin', label, None) | ('root', 'lib', [])."""
        parts = rel.split("/")
        if rel == "src/lib.rs":
            return "root", "lib", []
        if rel == "src/main.rs":
            return "bin", "bin:main", None
        top = parts[1][:-3] if len(parts) == 2 else parts[1]
        if top not in self.lib_mods:
            inner = "::".join(p[:-3] if p.endswith(".rs") else p for p in parts[1:])
            return "bin", f"bin:{inner.removesuffix('::mod')}", None
        if len(parts) == 2 or parts[2] == "mod.rs":
            return "lib", top, [top]
        child = parts[2][:-3] if len(parts) == 3 else parts[2]
        modpath = [top] + [p[:-3] if p.endswith(".rs") else p for p in parts[2:]]
        if modpath[-1] == "mod":
            modpath.pop()
        node = "kernels" if top == "kernels" else f"{top}::{child}"
        return "lib", node, modpath

    def node_of(self, abs_segs, reexports):
        """Node for an absolute path (segments after `crate`), with how it was resolved."""
        if not abs_segs or abs_segs[0] not in self.lib_mods:
            return None, None
        top = abs_segs[0]
        if top == "kernels":
            return "kernels", "direct"
        if len(abs_segs) >= 2:
            if abs_segs[1] in self.children.get(top, ()):
                return f"{top}::{abs_segs[1]}", "direct"
            if reexports is not None and (top, abs_segs[1]) in reexports:
                return reexports[(top, abs_segs[1])], "reexport"
        return top, "direct"


def resolve(segs, modpath):
    """Absolute segments for a path starting with crate/self/super, relative to modpath."""
    cur = list(modpath)
    rest = list(segs)
    if rest and rest[0] in ("crate", "$crate"):
        cur, rest = [], rest[1:]
    else:
        while rest and rest[0] in ("self", "super"):
            if rest[0] == "super":
                if not cur:
                    return None
                cur.pop()
            rest = rest[1:]
    if len(rest) > 1 and rest[-1] == "self":
        rest.pop()
    if rest and rest[-1] == "*":
        rest.pop()
    return cur + rest


def reexport_map(layout, clean):
    """(X, Name) -> 'X::child' for `pub use child::...Name` in X/mod.rs."""
    out = {}
    for top in layout.dir_mods:
        if top == "kernels":
            continue
        rel = f"src/{top}/mod.rs"
        if rel not in clean:
            continue
        s = clean[rel]
        for m in PUB_USE_RE.finditer(s):
            leaves, _ = parse_tree(s, m.end())
            for segs, alias, _pos in leaves:
                if segs and segs[0] in ("self", "super", "crate"):
                    segs = resolve(segs, [top])
                    if not segs or segs[0] != top:
                        continue
                    segs = segs[1:]
                if len(segs) >= 2 and segs[0] in layout.children[top] and segs[-1] not in ("*", "self"):
                    out[(top, alias or segs[-1])] = f"{top}::{segs[0]}"
    return out


def collect_refs(layout, clean, with_parent_edges, use_reexports):
    reexports = reexport_map(layout, clean) if use_reexports else None
    refs = []
    for rel in sorted(clean):
        kind, node, modpath = layout.classify(rel)
        if kind != "lib":
            continue
        s = clean[rel]
        idx = LineIndex(s)
        consumed = []
        found = []
        for m in PATH_START_RE.finditer(s):
            if consumed and m.start() < consumed[-1][1]:
                continue
            leaves, end = parse_tree(s, m.start())
            consumed.append((m.start(), end))
            found.append((m.group(1), leaves))
        is_mod_rs = rel.endswith("/mod.rs") and node in layout.dir_mods
        if with_parent_edges and is_mod_rs and layout.children.get(node):
            names = "|".join(sorted(map(re.escape, layout.children[node])))
            bare = re.compile(rf"(?<![A-Za-z0-9_:.$])({names})\s*::")
            starts = [a for a, _ in consumed]
            for m in bare.finditer(s):
                k = bisect.bisect_right(starts, m.start()) - 1
                if k >= 0 and m.start() < consumed[k][1]:
                    continue
                leaves, end = parse_tree(s, m.start())
                found.append(("child", [(["self"] + sg, al, p) for sg, al, p in leaves]))
        for how, leaves in found:
            for segs, _alias, pos in leaves:
                absp = resolve(segs, modpath)
                if absp is None:
                    continue
                dst, via = layout.node_of(absp, reexports)
                if dst is None or dst == node:
                    continue
                shown = "::".join(segs[1:] if how == "child" else segs)  # child: drop the added self
                refs.append({
                    "from": node, "to": dst, "file": rel, "line": idx.line(pos),
                    "path": shown, "syntax": how, "via": via,
                })
    # classify parent/child edges
    kept, dropped = [], []
    for r in refs:
        a, b = r["from"], r["to"]
        pc = (a.split("::")[0] == b.split("::")[0]) and ("::" not in a or "::" not in b)
        r["parent_child"] = pc
        (dropped if pc and not with_parent_edges else kept).append(r)
    return kept, dropped, reexports or {}


# ---------------------------------------------------------------------------------------------
# Graphs


def build_edges(refs, collapse):
    edges = defaultdict(list)
    for r in refs:
        a, b = r["from"], r["to"]
        if collapse:
            a, b = a.split("::")[0], b.split("::")[0]
        if a != b:
            edges[(a, b)].append(r)
    return edges


def sccs(nodes, adj):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(adj.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(adj.get(w, ())))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return sorted((c for c in out if len(c) > 1), key=lambda c: (-len(c), c))


def shortest_cycle(comp, adj):
    members = set(comp)
    best = None
    for s in comp:
        prev = {s: None}
        q = deque([s])
        found = None
        while q and found is None:
            v = q.popleft()
            for w in sorted(adj.get(v, ())):
                if w not in members:
                    continue
                if w == s:
                    found = v
                    break
                if w not in prev:
                    prev[w] = v
                    q.append(w)
        if found is None:
            continue
        path = [found]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        path.reverse()  # s ... found, then back to s
        if best is None or len(path) < len(best):
            best = path
    return best + [best[0]] if best else None


def graph_view(refs, collapse, nodes):
    edges = build_edges(refs, collapse)
    adj = defaultdict(set)
    for a, b in edges:
        adj[a].add(b)
    comps = sccs(nodes, adj)
    ev = lambda rs: [{"file": r["file"], "line": r["line"], "path": r["path"], "via": r["via"],
                      "syntax": r["syntax"]} for r in sorted(rs, key=lambda r: (r["file"], r["line"], r["path"]))]
    edge_list = [{"from": a, "to": b, "count": len(rs), "evidence": ev(rs)}
                 for (a, b), rs in sorted(edges.items())]
    comp_list = []
    for c in comps:
        cyc = shortest_cycle(c, adj)
        inner = [e for e in edge_list if e["from"] in c and e["to"] in c]
        mutual = sorted({tuple(sorted((e["from"], e["to"]))) for e in inner
                         if (e["to"], e["from"]) in edges})
        comp_list.append({
            "members": c,
            "example_cycle": cyc,
            "example_cycle_edges": [next(e for e in inner if e["from"] == a and e["to"] == b)
                                    for a, b in zip(cyc, cyc[1:])],
            "mutual_pairs": [list(p) for p in mutual],
            "edges": inner,
        })
    return {"nodes": sorted(nodes), "edges": edge_list, "sccs": comp_list}


# ---------------------------------------------------------------------------------------------
# Line counts and functions


def line_count(text):
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def code_lines(text):
    return sum(1 for l in sanitize(text, blank_strings=False).splitlines() if l.strip())


def match_brace(s, open_pos):
    depth = 0
    for k in range(open_pos, len(s)):
        if s[k] == "{":
            depth += 1
        elif s[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    return None


def body_open(s, i):
    """Position of the `{` opening the item whose header starts at i, or None for `;`."""
    paren = 0
    for k in range(i, len(s)):
        c = s[k]
        if c in "([":
            paren += 1
        elif c in ")]":
            paren -= 1
        elif paren == 0 and c == "{":
            return k
        elif paren == 0 and c == ";":
            return None
    return None


def impl_name(header):
    h = header.strip()
    if h.startswith("<"):
        depth = 0
        for k, c in enumerate(h):
            depth += (c == "<") - (c == ">")
            if depth == 0:
                h = h[k + 1:]
                break
    h = re.split(r"\bwhere\b", h)[0]
    parts = re.split(r"\bfor\b", h, maxsplit=1)
    target = parts[1] if len(parts) == 2 else parts[0]
    target = re.sub(r"<.*", "", target, flags=re.S)
    idents = [x for x in re.findall(r"[A-Za-z_]\w*", target) if x not in ("dyn", "mut", "const")]
    return idents[-1] if idents else "?"


def functions(files, clean):
    out = []
    for rel in sorted(files):
        s = clean[rel]
        idx = LineIndex(s)
        scopes = []  # (start, end, name)
        for m in IMPL_RE.finditer(s):
            o = body_open(s, m.end())
            if o is not None:
                e = match_brace(s, o)
                if e is not None:
                    scopes.append((o, e, impl_name(s[m.end():o])))
        for m in TRAIT_RE.finditer(s):
            o = body_open(s, m.end())
            if o is not None:
                e = match_brace(s, o)
                if e is not None:
                    scopes.append((o, e, m.group(1)))
        for m in FN_RE.finditer(s):
            o = body_open(s, m.end())
            if o is None:
                continue
            e = match_brace(s, o)
            if e is None:
                continue
            name = m.group(1).removeprefix("r#")
            inner = [sc for sc in scopes if sc[0] < m.start() < sc[1]]
            if inner:
                name = f"{max(inner, key=lambda sc: sc[0])[2]}::{name}"
            a, b = idx.line(m.start()), idx.line(e)
            out.append({"name": name, "file": rel, "line": a, "end_line": b, "lines": b - a + 1})
    out.sort(key=lambda f: (-f["lines"], f["file"], f["line"]))
    return out


def line_counts(layout, files):
    mods, bins, root = {}, {}, None
    for rel in sorted(files):
        kind, node, _ = layout.classify(rel)
        rec = {"files": 1, "lines": line_count(files[rel]), "code": code_lines(files[rel])}
        if kind == "root":
            root = dict(rec, file=rel)
            continue
        key = node.split("::")[0] if kind == "lib" else node
        tgt = mods if kind == "lib" else bins
        cur = tgt.setdefault(key, {"files": 0, "lines": 0, "code": 0})
        for k in ("files", "lines", "code"):
            cur[k] += rec[k]
    total = {k: sum(v[k] for v in list(mods.values()) + list(bins.values()) + ([root] if root else []))
             for k in ("files", "lines", "code")}
    return {"modules": mods, "lib_rs": root, "bin": bins, "total": total}


# ---------------------------------------------------------------------------------------------
# Report


def fmt_ev(e):
    via = " (via re-export)" if e["via"] == "reexport" else ""
    return f"{e['file']}:{e['line']}  {e['path']}{via}"


def print_view(title, view, max_ev, show_adjacency, w):
    w(f"== {title}")
    w(f"   {len(view['nodes'])} nodes, {len(view['edges'])} edges")
    if show_adjacency:
        out = defaultdict(list)
        for e in view["edges"]:
            out[e["from"]].append(f"{e['to']}({e['count']})")
        for n in view["nodes"]:
            w(f"   {n:<24} -> {', '.join(out.get(n, [])) or '-'}")
    if not view["sccs"]:
        w("   cycles (SCCs of size > 1): none")
        return
    w(f"   cycles (SCCs of size > 1): {len(view['sccs'])}")
    for k, c in enumerate(view["sccs"], 1):
        w(f"   [{k}] {len(c['members'])} nodes: {', '.join(c['members'])}")
        if c["mutual_pairs"]:
            w(f"       mutual imports: {', '.join(a + ' <-> ' + b for a, b in c['mutual_pairs'])}")
        w(f"       example cycle: {' -> '.join(c['example_cycle'])}")
        for e in c["example_cycle_edges"]:
            w(f"         {e['from']} -> {e['to']}  ({e['count']} refs)")
            for x in e["evidence"][:max_ev]:
                w(f"             {fmt_ev(x)}")
            if e["count"] > max_ev:
                w(f"             ... {e['count'] - max_ev} more")
        w(f"       all edges inside this SCC ({len(c['edges'])}):")
        for e in c["edges"]:
            w(f"         {e['from']:<22} -> {e['to']:<22} {e['count']:>3} refs, e.g. {fmt_ev(e['evidence'][0])}")
    w("")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.dirname(here), help="crate root (default: repo of this script)")
    ap.add_argument("--rev", help="read src/ from this git revision instead of the work tree")
    ap.add_argument("--json", metavar="OUT", help="also write everything as JSON to OUT")
    ap.add_argument("--top", type=int, default=10, help="how many largest functions to print (10)")
    ap.add_argument("--evidence", type=int, default=3, help="file:line lines per cycle edge (3)")
    ap.add_argument("--with-parent-edges", action="store_true",
                    help="keep mod.rs <-> own-child edges (and mod.rs's bare child:: paths)")
    ap.add_argument("--no-reexports", action="store_true",
                    help="don't resolve crate::X::Item through X/mod.rs `pub use child::Item`")
    ap.add_argument("--adjacency", action="store_true", help="also print the submodule adjacency list")
    a = ap.parse_args()

    files = read_git(a.root, a.rev) if a.rev else read_worktree(a.root)
    if "src/lib.rs" not in files:
        sys.exit(f"no src/lib.rs under {a.root}")
    clean = {rel: sanitize(t) for rel, t in files.items()}
    layout = Layout(files)
    refs, dropped, reexports = collect_refs(layout, clean, a.with_parent_edges, not a.no_reexports)

    sub_nodes = set()
    for rel in files:
        kind, node, _ = layout.classify(rel)
        if kind == "lib":
            sub_nodes.add(node)
    top_view = graph_view(refs, True, set(layout.lib_mods))
    sub_view = graph_view(refs, False, sub_nodes)
    lc = line_counts(layout, files)
    fns = functions(files, clean)

    lines = []
    w = lines.append
    source = f"git {a.rev}" if a.rev else "work tree"
    w(f"diffuse module graph — {os.path.abspath(a.root)} ({source}), {len(files)} .rs files under src/")
    w(f"references kept: {len(refs)}; mod.rs<->own-child references "
      f"{'kept' if a.with_parent_edges else 'left out'}: {len(dropped) if not a.with_parent_edges else sum(r['parent_child'] for r in refs)}; "
      f"re-exports resolved: {'no' if a.no_reexports else len(reexports)}")
    if layout.undeclared:
        w(f"NOTE: under src/ but not declared in lib.rs (treated as library modules anyway): "
          f"{', '.join(layout.undeclared)}")
    w("")
    print_view("(a) top-level module graph", top_view, a.evidence, True, w)
    print_view("(b) submodule-level graph", sub_view, a.evidence, a.adjacency, w)

    w("== line counts (all lines / non-blank non-comment lines)")
    rows = [(k, v) for k, v in sorted(lc["modules"].items(), key=lambda kv: -kv[1]["lines"])]
    if lc["lib_rs"]:
        rows.append(("lib.rs", lc["lib_rs"]))
    rows += sorted(lc["bin"].items(), key=lambda kv: kv[0])
    for k, v in rows:
        w(f"   {k:<18} {v['lines']:>6} {v['code']:>6}   ({v['files']} file{'s' if v['files'] != 1 else ''})")
    lib_total = sum(v["lines"] for v in lc["modules"].values()) + (lc["lib_rs"]["lines"] if lc["lib_rs"] else 0)
    bin_total = sum(v["lines"] for v in lc["bin"].values())
    w(f"   {'library total':<18} {lib_total:>6}")
    w(f"   {'binary total':<18} {bin_total:>6}")
    w(f"   {'total':<18} {lc['total']['lines']:>6} {lc['total']['code']:>6}   ({lc['total']['files']} files)")
    w("")
    w(f"== {a.top} largest functions (lines from `fn` to closing brace)")
    for f in fns[:a.top]:
        w(f"   {f['lines']:>5}  {f['name']:<40} {f['file']}:{f['line']}")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)

    if a.json:
        doc = {
            "root": os.path.abspath(a.root), "source": source,
            "options": {"with_parent_edges": a.with_parent_edges, "reexports": not a.no_reexports},
            "library_modules": layout.lib_mods,
            "undeclared_in_lib_rs": layout.undeclared,
            "reexports": {f"{k[0]}::{k[1]}": v for k, v in sorted(reexports.items())},
            "toplevel": top_view, "submodule": sub_view,
            "left_out_parent_child_refs": [] if a.with_parent_edges else
            sorted(({k: r[k] for k in ("from", "to", "file", "line", "path")} for r in dropped),
                   key=lambda r: (r["file"], r["line"], r["path"])),
            "line_counts": lc,
            "largest_functions": fns[:a.top],
            "functions": fns,
        }
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
