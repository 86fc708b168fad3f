//! The code's layout: no import circles between modules.
//!
//! Reads the sources of every crate (no model, no build): each file's `use` trees and the
//! `crate::`/`super::` paths written out in code give edges between modules, seen at every
//! level of the module tree: `trainer::train::step` using `crate::optim::AdamW` is the edge
//! `train -> optim` between the crate's top-level modules, `engines::export` using
//! `super::load` is `export -> load` inside `engines`. A child using its parent (or the
//! parent declaring its children) is no edge. Any circle among siblings fails the test, which
//! prints it with the line of each import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: &[&str] = &["schema", "data", "models", "trainer", "forge"];

type ModPath = Vec<String>;

/// Where an edge was seen: file and line.
type Evidence = (PathBuf, usize);

/// A token and its line.
type Token = (Tok, usize);

/// A crate's module graph: the modules its files define and the edges between siblings.
#[derive(Default)]
struct Graph {
    modules: BTreeSet<ModPath>,
    /// (from, to) -> where it was first seen.
    edges: BTreeMap<(ModPath, ModPath), Evidence>,
}

fn name(p: &[String]) -> String {
    if p.is_empty() {
        "crate".into()
    } else {
        p.join("::")
    }
}

/// The module a source file defines (`src/a/b.rs` and `src/a/b/mod.rs` are `a::b`).
fn file_module(src: &Path, file: &Path) -> Option<ModPath> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return Some(Vec::new());
    }
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments, strings and char literals blanked (newlines kept, so line
/// numbers stay right).
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    while i < c.len() {
        let at = |k: usize| c.get(i + k).copied().unwrap_or('\0');
        if at(0) == '/' && at(1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if at(0) == '/' && at(1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if (at(0) == 'r' || (at(0) == 'b' && at(1) == 'r'))
            && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
            && {
                let mut k = if at(0) == 'b' { 2 } else { 1 };
                while at(k) == '#' {
                    k += 1;
                }
                at(k) == '"'
            }
        {
            // raw string r#"..."#
            let s = if at(0) == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while at(s + hashes) == '#' {
                hashes += 1;
            }
            i += s + hashes + 1;
            out.push_str("\"\"");
            while i < c.len() {
                if c[i] == '"' && (0..hashes).all(|h| c.get(i + 1 + h) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if at(0) == '"' {
            i += 1;
            out.push_str("\"\"");
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            i += 1;
        } else if at(0) == '\'' && (at(1) == '\\' || at(2) == '\'') {
            // a char literal ('x', '\n', '\u{..}'); a lifetime has no closing quote
            i += 1;
            while i < c.len() && c[i] != '\'' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// An identifier or a path `a::b::c` (also `crate::x`, `super::super::y`).
    Path(Vec<String>),
    Punct(char),
}

/// Tokens with their line numbers: paths, and the punctuation the scan needs.
fn tokens(s: &str) -> Vec<Token> {
    let c: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ident(ch) {
            let mut segs = Vec::new();
            loop {
                let st = i;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                segs.push(c[st..i].iter().collect::<String>());
                // `::` followed by another identifier continues the path
                let mut j = i;
                while j < c.len() && c[j] == ' ' {
                    j += 1;
                }
                if j + 2 < c.len() && c[j] == ':' && c[j + 1] == ':' {
                    let mut k = j + 2;
                    while k < c.len() && c[k] == ' ' {
                        k += 1;
                    }
                    if k < c.len() && ident(c[k]) {
                        i = k;
                        continue;
                    }
                    // `a::{` or `a::*`: the path ends, the `::` is punctuation
                    out.push((Tok::Path(segs), line));
                    out.push((Tok::Punct(':'), line));
                    i = j + 2;
                    segs = Vec::new();
                }
                break;
            }
            if !segs.is_empty() {
                out.push((Tok::Path(segs), line));
            }
        } else if "{};,*".contains(ch) {
            out.push((Tok::Punct(ch), line));
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

/// The paths a use tree names, from token `i` (after `use`) to its `;`. Returns the paths
/// and the index after the `;`.
fn use_tree(toks: &[Token], mut i: usize) -> (Vec<ModPath>, usize) {
    fn tree(toks: &[Token], i: &mut usize, prefix: &[String], out: &mut Vec<ModPath>) {
        let mut path = prefix.to_vec();
        if let Some((Tok::Path(p), _)) = toks.get(*i) {
            path.extend(p.iter().cloned());
            *i += 1;
            // `x as y`
            if matches!(toks.get(*i), Some((Tok::Path(p), _)) if p.len() == 1 && p[0] == "as") {
                *i += 2;
            }
        }
        if matches!(toks.get(*i), Some((Tok::Punct(':'), _))) {
            *i += 1;
        }
        match toks.get(*i) {
            Some((Tok::Punct('{'), _)) => {
                *i += 1;
                loop {
                    match toks.get(*i) {
                        Some((Tok::Punct('}'), _)) => {
                            *i += 1;
                            break;
                        }
                        Some((Tok::Punct(','), _)) => *i += 1,
                        None => break,
                        _ => tree(toks, i, &path, out),
                    }
                }
            }
            Some((Tok::Punct('*'), _)) => {
                *i += 1;
                out.push(path);
            }
            _ => {
                if path.last().is_some_and(|s| s == "self") {
                    path.pop();
                }
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    while i < toks.len() && toks[i].0 != Tok::Punct(';') {
        let before = i;
        tree(toks, &mut i, &[], &mut out);
        if i == before {
            i += 1;
        }
    }
    (out, i + 1)
}

/// The module `path` (as written in module `at`) refers to: the longest known module that
/// starts it, or None for another crate's path.
fn resolve(path: &[String], at: &[String], known: &BTreeSet<ModPath>) -> Option<ModPath> {
    let first = path.first()?;
    let mut abs: ModPath = match first.as_str() {
        "crate" => path[1..].to_vec(),
        "self" => at.iter().chain(&path[1..]).cloned().collect(),
        "super" => {
            let ups = path.iter().take_while(|s| *s == "super").count();
            if ups > at.len() {
                return None;
            }
            at[..at.len() - ups].iter().chain(&path[ups..]).cloned().collect()
        }
        _ => {
            // a child module of `at` named without a prefix (2018 paths), else another crate
            let mut child = at.to_vec();
            child.push(first.clone());
            if !known.contains(&child) {
                return None;
            }
            at.iter().chain(path).cloned().collect()
        }
    };
    while !known.contains(&abs) {
        abs.pop()?;
    }
    Some(abs)
}

/// The edge between the siblings under the two modules' common parent, if neither contains
/// the other.
fn sibling_edge(from: &[String], to: &[String]) -> Option<(ModPath, ModPath)> {
    let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common == from.len() || common == to.len() {
        return None;
    }
    Some((from[..=common].to_vec(), to[..=common].to_vec()))
}

/// Reads a crate's `src/`: its modules and the edges between siblings.
fn crate_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g = Graph::default();
    let parsed: Vec<(PathBuf, ModPath, Vec<Token>)> = files
        .into_iter()
        .filter_map(|f| {
            let m = file_module(src, &f)?;
            let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            Some((f, m, tokens(&strip(&text))))
        })
        .collect();
    for (_, m, _) in &parsed {
        g.modules.insert(m.clone());
    }
    // inline modules (`mod tests { .. }`) are modules too
    let mut refs: Vec<(PathBuf, usize, ModPath, ModPath)> = Vec::new();
    for (file, m, toks) in &parsed {
        let mut depth = 0usize;
        // (inline module, brace depth inside it)
        let mut inline: Vec<(String, usize)> = Vec::new();
        let here = |inline: &[(String, usize)]| -> ModPath {
            m.iter().cloned().chain(inline.iter().map(|(n, _)| n.clone())).collect()
        };
        let mut i = 0;
        while i < toks.len() {
            match &toks[i].0 {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    depth = depth.saturating_sub(1);
                    if inline.last().is_some_and(|(_, d)| *d > depth) {
                        inline.pop();
                    }
                }
                Tok::Path(p) if p.len() == 1 && p[0] == "mod" => {
                    if let (Some((Tok::Path(n), _)), Some((Tok::Punct('{'), _))) = (toks.get(i + 1), toks.get(i + 2)) {
                        depth += 1;
                        inline.push((n[0].clone(), depth));
                        g.modules.insert(here(&inline));
                        i += 3;
                        continue;
                    }
                }
                Tok::Path(p) if p.len() == 1 && p[0] == "use" => {
                    let (paths, next) = use_tree(toks, i + 1);
                    let line = toks[i].1;
                    for p in paths {
                        refs.push((file.clone(), line, here(&inline), p));
                    }
                    i = next;
                    continue;
                }
                Tok::Path(p) if p.len() > 1 && (p[0] == "crate" || p[0] == "super") => {
                    refs.push((file.clone(), toks[i].1, here(&inline), p.clone()));
                }
                _ => {}
            }
            i += 1;
        }
    }
    for (file, line, at, path) in refs {
        let Some(to) = resolve(&path, &at, &g.modules) else {
            continue;
        };
        if let Some(e) = sibling_edge(&at, &to) {
            g.edges.entry(e).or_insert((file, line));
        }
    }
    g
}

/// Every circle of the graph, once each: for each strongly connected component of two or
/// more modules, one circle through it (a path back to its first module).
fn circles(g: &Graph) -> Vec<Vec<ModPath>> {
    let mut next: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (a, b) in g.edges.keys() {
        next.entry(a).or_default().push(b);
    }
    let reach = |from: &ModPath| -> BTreeSet<ModPath> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for m in next.get(&n).into_iter().flatten() {
                if seen.insert((*m).clone()) {
                    stack.push((*m).clone());
                }
            }
        }
        seen
    };
    let nodes: BTreeSet<ModPath> = g.edges.keys().flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
    let reaches: BTreeMap<ModPath, BTreeSet<ModPath>> = nodes.iter().map(|n| (n.clone(), reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in &nodes {
        if done.contains(n) || !reaches[n].contains(n) {
            continue;
        }
        let scc: BTreeSet<ModPath> = reaches[n].iter().filter(|m| reaches[*m].contains(n)).cloned().collect();
        done.extend(scc.iter().cloned());
        // shortest way round from n (breadth first inside the component)
        let mut prev: BTreeMap<ModPath, ModPath> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([n.clone()]);
        'bfs: while let Some(a) = queue.pop_front() {
            for b in next.get(&a).into_iter().flatten() {
                if !scc.contains(*b) {
                    continue;
                }
                if *b == n {
                    prev.insert(n.clone(), a.clone());
                    break 'bfs;
                }
                if !prev.contains_key(*b) {
                    prev.insert((*b).clone(), a.clone());
                    queue.push_back((*b).clone());
                }
            }
        }
        let mut circle = vec![n.clone()];
        let mut cur = prev[n].clone();
        while cur != *n {
            circle.push(cur.clone());
            cur = prev[&cur].clone();
        }
        circle.push(n.clone());
        circle.reverse();
        out.push(circle);
    }
    out
}

fn report(krate: &str, g: &Graph, circle: &[ModPath]) -> String {
    let mut s = format!(
        "{krate}: {}",
        circle.iter().map(|m| name(m)).collect::<Vec<_>>().join(" -> ")
    );
    for w in circle.windows(2) {
        if let Some((f, line)) = g.edges.get(&(w[0].clone(), w[1].clone())) {
            s.push_str(&format!(
                "\n    {} -> {}: {}:{line}",
                name(&w[0]),
                name(&w[1]),
                f.display()
            ));
        }
    }
    s
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn graph_of(krate: &str) -> Graph {
    crate_graph(&root().join(krate).join("src"))
}

#[test]
fn no_import_circles_between_modules() {
    let mut found = Vec::new();
    for krate in CRATES {
        let g = graph_of(krate);
        assert!(g.modules.len() > 1, "{krate}: no modules read");
        for c in circles(&g) {
            found.push(report(krate, &g, &c));
        }
    }
    assert!(
        found.is_empty(),
        "import circles between modules (each edge with the line that makes it):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_reader_sees_the_imports_it_should() {
    // guards the test above against a reader that finds nothing
    let t = graph_of("trainer");
    let p = |s: &str| -> ModPath { s.split("::").map(String::from).collect() };
    for (a, b) in [
        ("train", "optim"),              // use crate::optim::{..}
        ("train", "checkpointer"),       // use crate::checkpointer::Checkpointer
        ("train::step", "train::accum"), // use super::accum::{..}
        ("bench_train", "train"),        // use crate::train::{..}
    ] {
        assert!(t.edges.contains_key(&(p(a), p(b))), "edge {a} -> {b}");
    }
    // a child using its parent is no edge (engines::import uses super::LoadedDrafter)
    assert!(t
        .edges
        .keys()
        .all(|(a, b)| a.len() == b.len() && a[..a.len() - 1] == b[..b.len() - 1]));
    let m = graph_of("models");
    assert!(m.modules.contains(&p("drafters::eagle3")), "{:?}", m.modules);
    // an edge written as a fully qualified path in code
    let text = "fn f() { let x = crate::optim::clip_coef(1.0, 2.0); }";
    let toks = tokens(&strip(text));
    assert!(toks
        .iter()
        .any(|(t, _)| *t == Tok::Path(vec!["crate".into(), "optim".into(), "clip_coef".into()])));
}

#[test]
fn use_trees_and_paths_resolve() {
    let toks = tokens(&strip(
        "use crate::{a::{self, B}, c::D as E, f::*};\nuse super::g; // use crate::z;",
    ));
    let (paths, next) = use_tree(&toks, 1);
    let s: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(s, ["crate::a", "crate::a::B", "crate::c::D", "crate::f"]);
    assert_eq!(toks[next].0, Tok::Path(vec!["use".into()]));
    let (paths, _) = use_tree(&toks, next + 1);
    assert_eq!(paths, [vec!["super".to_string(), "g".to_string()]]);
    // strings and comments hide what looks like code
    let t = strip("let s = \"use crate::x;\"; /* crate::y */ let c = '{'; let r = r#\"}\"#;");
    assert!(!t.contains("crate") && !t.contains('{') && !t.contains('}'), "{t}");
    let known: BTreeSet<ModPath> = [vec![], vec!["a".into()], vec!["a".into(), "b".into()], vec!["c".into()]]
        .into_iter()
        .collect();
    let at = vec!["a".to_string(), "b".to_string()];
    let v = |s: &str| -> ModPath { s.split("::").map(String::from).collect() };
    assert_eq!(resolve(&v("super::super::c::X"), &at, &known), Some(v("c")));
    assert_eq!(resolve(&v("crate::a::b::Y"), &at, &known), Some(v("a::b")));
    assert_eq!(resolve(&v("tch::Tensor"), &at, &known), None);
    assert_eq!(sibling_edge(&v("a::b"), &v("c")), Some((v("a"), v("c"))));
    assert_eq!(sibling_edge(&v("a::b"), &v("a")), None);
}

#[test]
fn a_circle_is_found_and_printed() {
    let v = |s: &str| -> ModPath { s.split("::").map(String::from).collect() };
    let mut g = Graph::default();
    for (a, b) in [
        ("x", "y"),
        ("y", "z"),
        ("z", "x"),
        ("z", "w"),
        ("e::i", "e::j"),
        ("e::j", "e::i"),
    ] {
        g.edges.insert((v(a), v(b)), (PathBuf::from(format!("src/{a}.rs")), 3));
    }
    let c = circles(&g);
    let r: Vec<String> = c.iter().map(|c| report("k", &g, c)).collect();
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(
        r[0].starts_with("k: e::i -> e::j -> e::i\n    e::i -> e::j: src/e::i.rs:3"),
        "{}",
        r[0]
    );
    assert!(r[1].starts_with("k: x -> y -> z -> x"), "{}", r[1]);
}
