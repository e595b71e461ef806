//! Tests that the crate's layers point one way (the map at the top of `lib.rs`): no two
//! top-level modules depend on each other, through any chain; metrics take plain numbers;
//! configuration imports no domain module; only the entry points import the HTTP layer.
//!
//! A module depends on another when its code (not its comments) names `crate::other`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The dependency graph of `src/`, read from the files.
fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = Graph::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).expect("src/ is readable").map(|e| e.expect("a dir entry").path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(&src).expect("under src/");
        let module = relative.iter().next().and_then(|m| m.to_str()).expect("a file name").trim_end_matches(".rs");
        if module == "lib" || module == "main" || module == "layering" {
            continue;
        }
        let code = std::fs::read_to_string(&path).expect("a source file is readable");
        let names = graph.entry(module.to_string()).or_default();
        names.extend(crate_names(&code).into_iter().filter(|name| name != module));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    graph.values_mut().for_each(|names| names.retain(|name| modules.contains(name)));
    graph
}

/// The modules `code` names as `crate::name` or inside `crate::{a, b::c}`, comments left out.
fn crate_names(code: &str) -> BTreeSet<String> {
    let code: String = code.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let ident = |text: &str| text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first name of each item at the group's own depth: `{a::{b, c}, d}` names a and d.
            let (mut depth, mut item_start) = (0, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        names.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names
}

/// The modules `from` reaches through one or more dependencies.
fn reachable(graph: &Graph, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut next: Vec<&String> = graph[from].iter().collect();
    while let Some(module) = next.pop() {
        if seen.insert(module.clone()) {
            next.extend(graph.get(module).into_iter().flatten());
        }
    }
    seen
}

#[test]
fn no_two_modules_depend_on_each_other() {
    let graph = graph();
    assert!(graph.len() > 10, "the graph was read: {graph:?}");
    let cycles: Vec<&String> = graph.keys().filter(|m| reachable(&graph, m).contains(*m)).collect();
    assert!(cycles.is_empty(), "modules on a cycle: {cycles:?}\n{graph:#?}");
}

#[test]
fn metrics_and_configuration_sit_below_the_domain() {
    let graph = graph();
    assert_eq!(graph["metrics"], BTreeSet::new(), "metrics take plain numbers");
    // The database layer (backends, bind limits) and the webhook scheme (its time window) are
    // infrastructure; the domain (store, flush, reconcile, source, ...) is not imported.
    let allowed: BTreeSet<String> = ["db", "webhook"].map(String::from).into();
    assert!(graph["config"].is_subset(&allowed), "config imports {:?}", graph["config"]);
}

#[test]
fn only_the_entry_points_import_the_http_layer() {
    let graph = graph();
    let importers: BTreeSet<&str> =
        graph.iter().filter(|(_, names)| names.contains("http")).map(|(module, _)| module.as_str()).collect();
    assert_eq!(importers, BTreeSet::from(["cli"]), "{graph:#?}");
}

#[test]
fn the_reader_sees_grouped_and_plain_imports_but_not_comments() {
    let code =
        "use crate::{app::{AppState, http}, db};\n// crate::cli is only mentioned\nlet x = crate::store::Keys::new();";
    assert_eq!(crate_names(code), BTreeSet::from(["app", "db", "store"].map(String::from)));
}
