//! The shape of `src/`: no import cycle among the top-level modules, the
//! generated protobuf code only at the edges, and no function over a
//! screen long unless a comment says why it is one piece.
//!
//! Reads every non-test source file of the library, follows its `crate::`
//! paths (in `use` lines and in code; comments and `#[cfg(test)]` items are
//! left out) and builds the graph of top-level modules. A cycle makes every
//! module in it impossible to read on its own, so the check names the cycle
//! and the lines that close it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The modules that may speak protobuf: the gRPC services and server
/// (`node`), the smart client, the node-to-node transport (`net`), the
/// protobuf edge itself, and the layout file's encoding (`serving::layout_file`,
/// checked separately below).
const PROTOBUF_EDGES: &[&str] = &["pb", "net", "node", "client"];

type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

#[test]
fn top_level_modules_import_each_other_without_a_cycle() {
    let graph = import_graph();
    let cycles = strongly_connected(&graph);
    let mut report = String::new();
    for cycle in &cycles {
        report.push_str(&format!("cycle among {cycle:?}:\n"));
        for from in cycle {
            for (to, lines) in &graph[from] {
                if cycle.contains(to) {
                    report.push_str(&format!("  {from} -> {to}: {}\n", lines.join("; ")));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "src/ has import cycles:\n{report}");
}

#[test]
fn only_the_edges_import_the_generated_protobuf_code() {
    let graph = import_graph();
    let mut offenders = Vec::new();
    for (from, edges) in &graph {
        if PROTOBUF_EDGES.contains(&from.as_str()) {
            continue;
        }
        if let Some(lines) = edges.get("pb") {
            let outside_the_layout_file: Vec<_> = lines
                .iter()
                .filter(|line| !line.starts_with("serving/layout_file.rs"))
                .collect();
            if !outside_the_layout_file.is_empty() {
                offenders.push(format!("{from}: {outside_the_layout_file:?}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "domain modules import crate::pb (convert at the edge instead):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_check_sees_a_cycle_when_there_is_one() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph
            .entry(from.into())
            .or_default()
            .insert(to.into(), vec![]);
        graph.entry(to.into()).or_default();
    }
    assert_eq!(strongly_connected(&graph), vec![vec!["a", "b", "c"]]);
    let refs = crate_references(
        "use crate::{a::X, b::{c, d}, e,\n f};\n// crate::c\nfn f() { crate::d::g() }\n#[cfg(test)]\nmod tests { use crate::e; }\n",
    );
    assert_eq!(refs, ["a", "b", "e", "f", "d"]);
}

/// Every top-level module of the library and, per module it imports, the
/// `file:line` places that import it.
fn import_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = Graph::new();
    let mut files = Vec::new();
    collect_rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&src, f)).collect();
    for module in &modules {
        graph.entry(module.clone()).or_default();
    }
    for file in &files {
        let Some(from) = top_module(&src, file) else {
            continue;
        };
        let relative = file.strip_prefix(&src).unwrap().display().to_string();
        if relative.ends_with("_tests.rs") {
            continue;
        }
        let text = fs::read_to_string(file).unwrap();
        let code = without_test_items(&without_comments(&text));
        for (offset, to) in crate_references_at(&code) {
            if to != from && modules.contains(&to) {
                let line = code[..offset].matches('\n').count() + 1;
                let at = format!("{relative}:{line}");
                graph
                    .get_mut(&from)
                    .unwrap()
                    .entry(to)
                    .or_default()
                    .push(at);
            }
        }
    }
    graph
}

fn collect_rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a library file belongs to (`None` for `lib.rs` and
/// the binaries).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "bin" && !name.ends_with("_tests")).then(|| name.to_string())
}

/// The top-level modules a piece of code names through `crate::`, including
/// each name of a `use crate::{a, b::{c, d}}` group.
fn crate_references(code: &str) -> Vec<String> {
    let code = without_test_items(&without_comments(code));
    crate_references_at(&code)
        .into_iter()
        .map(|(_, name)| name)
        .collect()
}

/// Each `crate::` reference in cleaned code, with the byte offset it is at.
fn crate_references_at(code: &str) -> Vec<(usize, String)> {
    let identifier = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            found.push((at, identifier(rest)));
            continue;
        };
        // The group's top-level items: split at commas outside inner braces.
        let mut depth = 0usize;
        let mut item_start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    found.push((at, identifier(&group[item_start..i])));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    found.push((at, identifier(&group[item_start..i])));
                    item_start = i + 1;
                }
                _ => {}
            }
        }
    }
    found.retain(|(_, name)| !name.is_empty());
    found
}

/// The code with `//` comments (doc comments included) blanked out, line
/// numbers kept.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code with every `#[cfg(test)]` item (a `mod tests { ... }`, a test
/// helper) blanked out, line numbers kept.
fn without_test_items(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        // The item ends at its `;` (a declaration) or its closing brace.
        let mut depth = 0usize;
        let mut end = item.len();
        for (i, c) in item.char_indices().skip("#[cfg(test)]".len()) {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        out.extend(
            item[..end]
                .chars()
                .map(|c| if c == '\n' { '\n' } else { ' ' }),
        );
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The import cycles: strongly connected components of more than one module
/// (Tarjan's algorithm), each sorted.
fn strongly_connected(graph: &Graph) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph[v].keys() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found.sort();
    walk.found
}

/// A function longer than this many lines (from its `fn` line to its closing
/// brace) must say why it is one piece.
const FUNCTION_LINES_MAX: usize = 80;

/// The marker a long function's comment carries when it stays whole.
const ONE_PIECE_MARKER: &str = "One piece:";

#[test]
fn every_long_function_says_why_it_is_one_piece() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect_rust_files(&src, &mut files);
    files.sort();
    let mut offenders = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap().display().to_string();
        let text = fs::read_to_string(file).unwrap();
        for long in long_functions_without_marker(&text) {
            offenders.push(format!("src/{relative}:{long}"));
        }
    }
    assert!(
        offenders.is_empty(),
        "functions over {FUNCTION_LINES_MAX} lines without a \"{ONE_PIECE_MARKER}\" comment \
         (split them, or say why they stay whole):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_length_check_sees_a_long_function() {
    let body = "    let x = \"}\";\n".repeat(FUNCTION_LINES_MAX);
    let long = format!("fn long() {{\n{body}}}\n");
    let found: Vec<String> = long_functions_without_marker(&long)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        found,
        [format!("1 long ({} lines)", FUNCTION_LINES_MAX + 2)]
    );
    let above = format!("/// One piece: a table.\n#[test]\n{long}");
    assert!(long_functions_without_marker(&above).is_empty());
    let inside =
        format!("pub async fn long(\n    x: u8,\n) {{\n    // One piece: a loop.\n{body}}}\n");
    assert!(long_functions_without_marker(&inside).is_empty());
    // A one-line function before a long item is short; a body-less trait
    // method is no function; braces in literals do not count.
    let short = format!(
        "fn short() -> char {{ '{{' }}\ntrait T {{ fn f(&self); }}\nconst S: &str = r#\"{{\"#;\nimpl X {{\n{body}}}\n"
    );
    assert!(long_functions_without_marker(&short).is_empty());
}

/// A function over `FUNCTION_LINES_MAX` lines without the marker.
struct LongFunction {
    /// The line its `fn` is on (from 1).
    line: usize,
    name: String,
    /// From the `fn` line to the closing brace.
    lines: usize,
}

impl std::fmt::Display for LongFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({} lines)", self.line, self.name, self.lines)
    }
}

/// Each function in `text` longer than `FUNCTION_LINES_MAX` lines whose
/// comment and attribute lines just above it, or first body lines, lack
/// the marker.
fn long_functions_without_marker(text: &str) -> Vec<LongFunction> {
    let lines: Vec<&str> = text.lines().collect();
    let depths = brace_depth_per_line(text);
    let mut found = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(name) = function_name(line) else {
            continue;
        };
        let Some((opens, end)) = function_body(&depths, at) else {
            continue;
        };
        let length = end - at + 1;
        if length <= FUNCTION_LINES_MAX {
            continue;
        }
        let above = lines[..at]
            .iter()
            .rev()
            .take_while(|l| {
                let l = l.trim_start();
                l.starts_with("//") || l.starts_with("#[")
            })
            .any(|l| l.contains(ONE_PIECE_MARKER));
        let first_body = lines[opens..(opens + 4).min(end)]
            .iter()
            .any(|l| l.contains(ONE_PIECE_MARKER));
        if !above && !first_body {
            found.push(LongFunction {
                line: at + 1,
                name: name.to_string(),
                lines: length,
            });
        }
    }
    found
}

/// The name of the function a line declares, if it declares one.
fn function_name(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    loop {
        let before = rest;
        for qualifier in [
            "pub(crate) ",
            "pub(super) ",
            "pub ",
            "async ",
            "const ",
            "unsafe ",
        ] {
            rest = rest.strip_prefix(qualifier).unwrap_or(rest);
        }
        if rest == before {
            break;
        }
    }
    let rest = rest.strip_prefix("fn ")?;
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// The brace depth over one line of code.
#[derive(Clone, Copy, Default)]
struct LineDepth {
    /// At the line's start.
    before: usize,
    /// At its end.
    after: usize,
    /// The deepest it went on the line.
    deepest: usize,
    /// Whether a `;` sits at the depth the line started at.
    semicolon: bool,
}

/// For a function declared on line `start`: the line its body opens on
/// and the line it closes on (the first where the depth falls back to
/// where the declaration started). `None` for a declaration without a body
/// (a trait method).
fn function_body(depths: &[LineDepth], start: usize) -> Option<(usize, usize)> {
    let base = depths[start].before;
    for (i, line) in depths.iter().enumerate().skip(start) {
        if line.deepest > base {
            let end = depths
                .iter()
                .enumerate()
                .skip(i)
                .find(|(_, l)| l.after <= base)
                .map(|(j, _)| j)?;
            return Some((i, end));
        }
        if line.semicolon {
            return None;
        }
    }
    None
}

/// The brace depth of each line of `text`. Braces in `//` comments, in
/// strings (raw ones too) and in character literals do not count.
fn brace_depth_per_line(text: &str) -> Vec<LineDepth> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut line = LineDepth::default();
    let mut depth = 0usize;
    let end_line = |out: &mut Vec<LineDepth>, line: &mut LineDepth, depth: usize| {
        line.after = depth;
        out.push(*line);
        *line = LineDepth {
            before: depth,
            after: depth,
            deepest: depth,
            semicolon: false,
        };
    };
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\n' => end_line(&mut out, &mut line, depth),
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i + 1 < chars.len() && chars[i + 1] != '\n' {
                    i += 1;
                }
            }
            '"' => {
                // A string (a raw one's `r#` prefix was passed as identifier
                // characters): skip to its closing quote and hashes.
                let mut hashes = 0;
                let mut j = i;
                while j > 0 && chars[j - 1] == '#' {
                    hashes += 1;
                    j -= 1;
                }
                let raw = j > 0 && chars[j - 1] == 'r';
                i += 1;
                while i < chars.len() {
                    let escape = chars[i] == '\\' && !raw;
                    if escape {
                        // Skip the escaped character; a line continuation
                        // still ends a line.
                        i += 1;
                    }
                    if chars.get(i) == Some(&'\n') {
                        end_line(&mut out, &mut line, depth);
                    } else if !escape
                        && chars[i] == '"'
                        && (0..hashes).all(|h| chars.get(i + 1 + h) == Some(&'#'))
                    {
                        i += hashes;
                        break;
                    }
                    i += 1;
                }
            }
            '\'' => {
                // A character literal ('x', '\n', '\''); a lifetime has no
                // closing quote right after.
                if chars.get(i + 1) == Some(&'\\') {
                    // Past the backslash and the escaped character, to the
                    // closing quote ('\u{7f}' holds more).
                    i += 3;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                } else if chars.get(i + 2) == Some(&'\'') {
                    i += 2;
                }
            }
            '{' => {
                depth += 1;
                line.deepest = line.deepest.max(depth);
            }
            '}' => depth = depth.saturating_sub(1),
            ';' if depth == line.before => line.semicolon = true,
            _ => {}
        }
        i += 1;
    }
    end_line(&mut out, &mut line, depth);
    out
}
