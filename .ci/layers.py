#!/usr/bin/env python3
"""Fails when top-level modules of src/ import each other in a cycle, naming each cycle.

A top-level module is `src/NAME.rs` with everything under `src/NAME/`: it and its submodules
count as one. An edge A -> B is any `crate::B` path in A's code (in `use` lines, nested `use
crate::{..}` groups and paths in expressions alike); comments and `#[cfg(test)]` items are left
out, since tests may reach anywhere. lib.rs (the module map) and main.rs (the binary) are not
modules. Usage: layers.py [SRC_DIR]; exit 1 when a cycle exists, printing each strongly
connected set with its edges and one cycle through it.
"""
import os
import re
import sys


def strip_comments(text):
    """Drops // and /* */ comments; string literals are kept (a path in a string is no import)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(" ")
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def strip_cfg_test(text):
    """Drops each item after `#[cfg(test)]`: up to its `;` or its balanced `{ ... }`."""
    while True:
        i = text.find("#[cfg(test)]")
        if i < 0:
            return text
        j = i + len("#[cfg(test)]")
        depth = 0
        while j < len(text):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    j += 1
                    break
            elif c == ";" and depth == 0:
                j += 1
                break
            j += 1
        text = text[:i] + text[j:]


def group_heads(group):
    """The first name of each path in a `use crate::{...}` group, nested groups included."""
    heads, depth, start = [], 0, 0
    for k, c in enumerate(group + ","):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            m = re.match(r"\s*(\w+)", group[start:k])
            if m:
                heads.append(m.group(1))
            start = k + 1
    return heads


def use_groups(text):
    """The inside of each `crate::{ ... }`, braces balanced."""
    for m in re.finditer(r"crate::\{", text):
        depth, k = 1, m.end()
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        yield text[m.end() : k - 1]


def graph(root):
    mods = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            top = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".rs")
            if top in ("lib", "main"):
                continue
            deps = mods.setdefault(top, set())
            with open(path, encoding="utf-8") as fh:
                text = strip_cfg_test(strip_comments(fh.read()))
            deps.update(re.findall(r"crate::(\w+)", text))
            for group in use_groups(text):
                deps.update(group_heads(group))
    return {m: {d for d in deps if d in mods and d != m} for m, deps in mods.items()}


def sccs(g):
    """Tarjan's strongly connected components, iteratively."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(g[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def a_cycle(g, comp):
    """One shortest cycle through the component's first module, as a list of names."""
    members, first = set(comp), comp[0]
    prev, frontier = {first: None}, [first]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v] & members):
                if w == first:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [first]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "src"
    g = graph(root)
    bad = [c for c in sccs(g) if len(c) > 1]
    for comp in bad:
        print("cycle:", " ".join(comp))
        print("   e.g.", " -> ".join(a_cycle(g, comp)))
        for m in comp:
            print("  ", m, "->", " ".join(sorted(g[m] & set(comp))))
    if bad:
        print(f"layers: {len(bad)} import cycle(s) between top-level modules of {root}/;"
              " a module imports only from layers below it (see src/lib.rs)")
        return 1
    print(f"layers: no import cycle between the {len(g)} top-level modules of {root}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
