//! `cargo xtask layout`: the tree is the architecture, so check it.
//!
//! - No import circle among the top-level modules of `sidecar-user` (`crate::x`
//!   paths outside `#[cfg(test)]` modules, grouped `use crate::{a, b::c}` included).
//! - No source file (tests included) over [`MAX_LINES`] lines unless its module doc
//!   says why (a line containing `longer than 500 lines`).
//!
//! Prints the module graph (each module's dependencies) so a reader sees the layers.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// Longest a source file may be without saying why.
const MAX_LINES: usize = 500;

/// Checks `sidecar-user/src` and prints its module graph.
pub fn layout() -> Result<()> {
    let src = crate::workspace_root().join("sidecar-user/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files)?;
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
        let rel = file.strip_prefix(&src).unwrap_or(file);
        let lines = text.lines().count();
        let says_why = text
            .lines()
            .any(|l| l.starts_with("//!") && l.contains("longer than 500 lines"));
        if lines > MAX_LINES && !says_why {
            problems.push(format!(
                "{}: {lines} lines (over {MAX_LINES}; split it, or say why in its module doc)",
                rel.display()
            ));
        }
        if is_test_only(rel) {
            continue;
        }
        let top = top_module(rel);
        let deps = graph.entry(top.clone()).or_default();
        for dep in crate_paths(&without_tests(&without_comments(&text))) {
            if dep != top && dep != "self" {
                deps.insert(dep);
            }
        }
    }
    let modules: BTreeSet<&String> = graph.keys().collect();
    for (module, deps) in &graph {
        let deps: Vec<&str> = deps
            .iter()
            .filter(|d| modules.contains(d))
            .map(String::as_str)
            .collect();
        println!("{module:>14} -> {}", deps.join(", "));
    }
    for circle in circles(&graph) {
        problems.push(format!("import circle: {}", circle.join(" -> ")));
    }
    if !problems.is_empty() {
        bail!("layout:\n  {}", problems.join("\n  "));
    }
    println!("layout: no import circle, no file over {MAX_LINES} lines without a reason");
    Ok(())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// Files compiled only into tests (by the convention of their names: `tests.rs`,
/// `tests/`, `test_support.rs`, `testing.rs`): they may reach anywhere.
fn is_test_only(rel: &Path) -> bool {
    rel.components().any(|c| {
        let name = c.as_os_str().to_string_lossy();
        let stem = name.trim_end_matches(".rs");
        ["tests", "test_support", "testing"].contains(&stem)
    })
}

/// `proxy/copy.rs` -> `proxy`, `metrics.rs` -> `metrics`.
fn top_module(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_string()
}

/// The text with `//` comments removed (doc comments name paths too).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text up to its `#[cfg(test)]` module: tests may reach anywhere.
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The top-level modules named by `crate::` paths in `text`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = closing_brace(group);
            for item in split_top_level(&group[..end]) {
                if let Some(name) = ident(item.trim()) {
                    found.insert(name);
                }
            }
        } else if let Some(name) = ident(rest) {
            found.insert(name);
        }
    }
    found
}

/// Index of the `}` closing a group whose `{` was just consumed.
fn closing_brace(group: &str) -> usize {
    let mut depth = 1;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    group.len()
}

/// Items of a `{a, b::{c, d}, e}` group at its top level.
fn split_top_level(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

fn ident(s: &str) -> Option<String> {
    let name: String = s
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Each import circle once, as the path that closes it.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found: Vec<Vec<String>> = Vec::new();
    let mut seen_sets: BTreeSet<BTreeSet<String>> = BTreeSet::new();
    for start in graph.keys() {
        let mut path = vec![start.clone()];
        walk(graph, start, &mut path, &mut |circle| {
            let set: BTreeSet<String> = circle.iter().cloned().collect();
            if seen_sets.insert(set) {
                found.push(circle.to_vec());
            }
        });
    }
    found
}

fn walk(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    path: &mut Vec<String>,
    report: &mut impl FnMut(&[String]),
) {
    let Some(last) = path.last().cloned() else {
        return;
    };
    for next in graph.get(&last).into_iter().flatten() {
        if next == start {
            let mut circle = path.clone();
            circle.push(start.to_string());
            report(&circle);
        } else if !path.contains(next) && next.as_str() > start {
            // Only circles whose smallest module is `start`: each found once.
            path.push(next.clone());
            walk(graph, start, path, report);
            path.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_and_plain_paths_are_found() {
        let text = "use crate::{a, b::{c, d}, e::f};\nlet x = crate::g::h();";
        let found: Vec<String> = crate_paths(text).into_iter().collect();
        assert_eq!(found, ["a", "b", "e", "g"]);
    }

    #[test]
    fn a_circle_is_reported_once_and_a_chain_is_not() {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut edge = |a: &str, b: &str| {
            graph.entry(a.into()).or_default().insert(b.into());
        };
        edge("metrics", "proxy");
        edge("proxy", "service");
        edge("service", "metrics");
        edge("app", "proxy");
        let found = circles(&graph);
        assert_eq!(found, [vec!["metrics", "proxy", "service", "metrics"]]);
        if let Some(deps) = graph.get_mut("service") {
            deps.clear();
        }
        assert!(circles(&graph).is_empty());
    }

    #[test]
    fn test_modules_are_left_out() {
        let text = "use crate::a;\n#[cfg(test)]\nmod tests {\n use crate::b;\n}\n";
        let kept = without_tests(text);
        assert!(kept.contains("crate::a") && !kept.contains("crate::b"));
    }
}
