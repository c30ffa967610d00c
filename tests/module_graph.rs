//! The module graph of `src/` has no cycles: a module may use another only if that one does
//! not (directly or through others) use it back. Nodes are the crate's top-level modules
//! (`src/x.rs` and everything under `src/x/` are module `x`); edges are `crate::x` paths in
//! code (comments are skipped). A cycle fails the test and is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The top-level module a file under `src/` belongs to (`None` for the crate roots).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn leading_ident(s: &str) -> String {
    s.trim_start().chars().take_while(|c| is_ident(*c)).collect()
}

/// The top-level modules a source text names through `crate::…`, including grouped imports
/// (`use crate::{a::B, c};`). Line comments and doc comments are skipped.
fn referenced_modules(source: &str) -> BTreeSet<String> {
    let code: String =
        source.lines().map(|l| if l.trim_start().starts_with("//") { "" } else { l }).collect::<Vec<_>>().join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    let mut before: Option<char> = None;
    while let Some(at) = rest.find("crate::") {
        let prev = rest[..at].chars().next_back().or(before);
        let after = &rest[at + "crate::".len()..];
        let standalone = prev.is_none_or(|c| !is_ident(c) && c != '$');
        if standalone {
            if let Some(group) = after.strip_prefix('{') {
                // Split the group's top level at commas and take each item's first segment.
                let mut depth = 0;
                let mut item = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.insert(leading_ident(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
                found.insert(leading_ident(&item));
            } else {
                found.insert(leading_ident(after));
            }
        }
        before = Some(':');
        rest = after;
    }
    found.retain(|m| !m.is_empty());
    found
}

fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(src, f)).collect();
    let mut graph: Graph = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let Some(from) = module_of(src, file) else { continue };
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for to in referenced_modules(&text) {
            if to != from && modules.contains(&to) {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

/// One cycle of the graph (`[a, b, …, a]`), if there is any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit<'a>(
        graph: &'a Graph,
        node: &'a str,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        marks.insert(node, Mark::Open);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next.as_str()) {
                Some(Mark::Open) => {
                    let start = path.iter().position(|n| *n == next.as_str()).expect("open nodes are on the path");
                    let mut cycle: Vec<String> = path[start..].iter().map(|s| (*s).to_owned()).collect();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(c) = visit(graph, next, marks, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if !marks.contains_key(node.as_str())
            && let Some(c) = visit(graph, node, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_module_graph_of_src_is_acyclic() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() > 10, "expected the crate's modules under {}, found {:?}", src.display(), graph.keys());
    if let Some(cycle) = find_cycle(&graph) {
        let edges: Vec<String> = graph
            .iter()
            .filter(|(_, to)| !to.is_empty())
            .map(|(from, to)| format!("  {from} -> {}", to.iter().cloned().collect::<Vec<_>>().join(", ")))
            .collect();
        panic!("module cycle in src/: {}\nmodule graph:\n{}", cycle.join(" -> "), edges.join("\n"));
    }
}

#[test]
fn references_are_found_in_paths_and_groups_but_not_in_comments() {
    let text = "//! see crate::doc\nuse crate::a::B;\nuse crate::{b, c::{D, E}};\nlet x = crate::d::f();\n\
                pub(crate) fn g() { $crate::m!(); my_crate::n(); }\n    /// crate::e in a doc\n";
    let found: Vec<String> = referenced_modules(text).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d"]);
}

#[test]
fn a_cycle_is_found_and_named() {
    let graph: Graph = [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
        .collect();
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let acyclic: Graph = [("a", vec!["b", "c"]), ("b", vec!["c"]), ("c", vec![])]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
        .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
