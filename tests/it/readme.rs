//! README.md held to the code: its configuration reference against
//! `config/default.toml` (every key in both directions, defaults included), every
//! `TICKETFLOW__` variable it names against the settings loader, and its metrics
//! table against `ticketflow::telemetry::FAMILIES`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value as Json;
use toml::Value;

use crate::helpers::repo_path;

/// Tables whose keys the operator chooses, by path (with the placeholders of the
/// tables above them), and the placeholder their keys are documented under.
const MAP_TABLES: &[(&str, &str)] = &[
    ("providers", "<name>"),
    ("providers.<name>.models", "<model>"),
    ("tiers", "<name>"),
    ("policies", "<category>"),
    ("triage.keywords", "<flag>"),
    ("triage.category_keywords", "<category>"),
    ("budgets", "<tier>"),
    ("broker.kafka.properties", "<property>"),
];

/// Tables documented as one key: routing conditions, explained in the file's comment.
const LEAF_TABLES: &[&str] = &["routing.rules[].when"];

/// Documented keys the shipped file leaves unset (it shows them in a comment only),
/// each with a sample TOML value: the loader must accept them instead.
const UNSET_IN_FILE: &[(&str, &str)] =
    &[("budgets.<tier>.daily_usd", "200.0"), ("budgets.<tier>.when_spent", "\"cheap\"")];

/// A tier of the shipped file, standing in for `<tier>` when the unset keys are loaded.
const SAMPLE_TIER: &str = "premium";

/// Strings longer than this may be given as "see file" in the reference.
const SHORT_STRING: usize = 60;

/// How README.md writes a variable's form, not a variable.
const NOTATIONS: &[&str] = &["TICKETFLOW__SECTION__KEY"];

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn default_toml() -> toml::Table {
    read("config/default.toml").parse().unwrap_or_else(|e| panic!("config/default.toml: {e}"))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Every key of the file as the README documents it (keys of map-like tables replaced
/// by their placeholder, arrays of tables as `[]`), with the values it has in the file:
/// one per entry. A map-like table without entries still yields its placeholder key,
/// with no value.
fn flatten(table: &toml::Table, path: &str, out: &mut BTreeMap<String, Vec<Value>>) {
    let placeholder = MAP_TABLES.iter().find(|(p, _)| *p == path).map(|(_, ph)| *ph);
    if let (Some(ph), true) = (placeholder, table.is_empty()) {
        out.entry(join(path, ph)).or_default();
        return;
    }
    for (key, value) in table {
        let child = join(path, placeholder.unwrap_or(key));
        match value {
            Value::Table(t) if !LEAF_TABLES.contains(&child.as_str()) => flatten(t, &child, out),
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_table) => {
                for t in items.iter().filter_map(Value::as_table) {
                    flatten(t, &format!("{child}[]"), out);
                }
            }
            other => out.entry(child).or_default().push(other.clone()),
        }
    }
}

fn documented_keys_of_file() -> BTreeMap<String, Vec<Value>> {
    let mut keys = BTreeMap::new();
    flatten(&default_toml(), "", &mut keys);
    keys
}

/// The cells of a Markdown table row; a `|` inside backticks is text.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let (mut cells, mut cell, mut code) = (Vec::new(), String::new(), false);
    for c in inner.chars() {
        match c {
            '`' => {
                code = !code;
                cell.push(c);
            }
            '|' if !code => cells.push(std::mem::take(&mut cell).trim().to_owned()),
            _ => cell.push(c),
        }
    }
    cells.push(cell.trim().to_owned());
    cells
}

/// The body rows of the first table under `heading`, with their line numbers.
fn table_under(readme: &str, heading: &str) -> Vec<(usize, Vec<String>)> {
    let mut lines = readme.lines().enumerate().skip_while(|(_, l)| l.trim() != heading);
    assert!(lines.next().is_some(), "README.md has no `{heading}`");
    lines
        .take_while(|(_, l)| !l.starts_with('#'))
        .skip_while(|(_, l)| !l.starts_with('|'))
        .take_while(|(_, l)| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|(n, l)| (n + 1, cells(l)))
        .collect()
}

/// The text of a cell that is one code span, e.g. `` `limits.max_in_flight` ``.
fn code(cell: &str) -> Option<&str> {
    cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')).filter(|c| !c.contains('`'))
}

/// What a default cell says.
#[derive(Debug)]
enum StatedDefault<'a> {
    /// A value, as TOML (strings may go without quotes).
    Literal(&'a str),
    /// "… (see file)": too long for the table, or different per entry.
    SeeFile,
    /// "none": the file sets no value.
    Unset,
}

fn parse_default(cell: &str) -> Option<StatedDefault<'_>> {
    if cell == "none" {
        Some(StatedDefault::Unset)
    } else if cell.ends_with("(see file)") {
        Some(StatedDefault::SeeFile)
    } else {
        code(cell).map(StatedDefault::Literal)
    }
}

fn literal_matches(literal: &str, value: &Value) -> bool {
    match value {
        Value::String(s) => literal.strip_prefix('"').and_then(|l| l.strip_suffix('"')).unwrap_or(literal) == s,
        _ => format!("v = {literal}").parse::<toml::Table>().is_ok_and(|t| t.get("v") == Some(value)),
    }
}

fn short_scalar(value: &Value) -> bool {
    match value {
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) => true,
        Value::String(s) => s.chars().count() <= SHORT_STRING && !s.contains('\n'),
        _ => false,
    }
}

/// What is wrong with the default given for a key whose values in the file are `values`.
fn default_problem(stated: &StatedDefault<'_>, values: &[Value]) -> Option<String> {
    let Some(first) = values.first() else {
        return (!matches!(stated, StatedDefault::Unset)).then(|| "the file sets no value: write `none`".to_owned());
    };
    let uniform = values.iter().all(|v| v == first);
    match stated {
        StatedDefault::Literal(l) => {
            values.iter().find(|v| !literal_matches(l, v)).map(|v| format!("says `{l}`, the file has {v}"))
        }
        StatedDefault::SeeFile if uniform && short_scalar(first) => Some(format!("the file has {first}: state it")),
        StatedDefault::SeeFile => None,
        StatedDefault::Unset => Some(format!("says none, the file has {first}")),
    }
}

/// A table holding `value` at the dotted `path`.
fn table_with(path: &str, value: Value) -> toml::Table {
    let (head, key) = path.rsplit_once('.').unwrap_or(("", path));
    let mut table = toml::Table::from_iter([(key.to_owned(), value)]);
    if !head.is_empty() {
        for part in head.rsplit('.') {
            table = toml::Table::from_iter([(part.to_owned(), Value::Table(table))]);
        }
    }
    table
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Loads the defaults with `layer` on top, as `--config FILE` would.
fn load_with_layer(layer: &toml::Table) -> Result<ticketflow::settings::Settings, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.toml");
    std::fs::write(&path, toml::to_string(layer).unwrap()).unwrap();
    ticketflow::policy::load_from(Some(&path), &BTreeMap::new()).map_err(|e| e.to_string())
}

#[test]
fn the_configuration_reference_documents_every_key_of_the_default_file_and_no_other() {
    let readme = read("README.md");
    let rows = table_under(&readme, "### Configuration reference");
    assert!(rows.len() > 50, "the configuration reference has only {} rows", rows.len());
    let file = documented_keys_of_file();
    let unset: BTreeMap<&str, &str> = UNSET_IN_FILE.iter().copied().collect();
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for (line, row) in &rows {
        let [key, default, what] = &row[..] else {
            problems.push(format!("README.md:{line}: {} cells, not 3 (key, default, what it does)", row.len()));
            continue;
        };
        let Some(key) = code(key) else {
            problems.push(format!("README.md:{line}: the key `{key}` is not one code span"));
            continue;
        };
        if !documented.insert(key.to_owned()) {
            problems.push(format!("README.md:{line}: `{key}` is documented twice"));
        }
        if what.is_empty() {
            problems.push(format!("README.md:{line}: `{key}` says nothing about what it does"));
        }
        let Some(stated) = parse_default(default) else {
            problems.push(format!(
                "README.md:{line}: `{key}`: the default `{default}` is neither one code span, \"… (see file)\" nor \"none\""
            ));
            continue;
        };
        match (file.get(key), unset.contains_key(key)) {
            (Some(values), _) => {
                if let Some(p) = default_problem(&stated, values) {
                    problems.push(format!("README.md:{line}: `{key}`: {p}"));
                }
            }
            (None, true) if matches!(stated, StatedDefault::Unset) => {}
            (None, true) => problems.push(format!("README.md:{line}: `{key}` is unset in the file: write `none`")),
            (None, false) => problems.push(format!("README.md:{line}: `{key}` is not a key of config/default.toml")),
        }
    }
    for key in file.keys().filter(|k| !documented.contains(*k)) {
        problems.push(format!("`{key}` of config/default.toml is not in README.md's configuration reference"));
    }
    for key in unset.keys().filter(|k| !documented.contains(**k)) {
        problems.push(format!("`{key}` (unset in the file) is not in README.md's configuration reference"));
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn keys_the_default_file_leaves_unset_are_accepted_by_the_loader() {
    let mut layer = toml::Table::new();
    for (key, sample) in UNSET_IN_FILE {
        let value: Value = format!("v = {sample}").parse::<toml::Table>().unwrap().remove("v").unwrap();
        assert!(
            !documented_keys_of_file().contains_key(*key),
            "`{key}` is set in the file now: drop it from UNSET_IN_FILE"
        );
        merge(&mut layer, table_with(&key.replace("<tier>", SAMPLE_TIER), value));
    }
    let settings = load_with_layer(&layer).unwrap_or_else(|e| panic!("{layer:?}: {e}"));
    let budget = &settings.budgets[SAMPLE_TIER];
    assert_eq!((budget.daily_usd, budget.when_spent.as_str()), (200.0, "cheap"));
    // The same layer with a key the loader does not know is refused: acceptance above
    // means the keys are real.
    merge(&mut layer, table_with(&format!("budgets.{SAMPLE_TIER}.daily_cap"), Value::Float(1.0)));
    let err = load_with_layer(&layer).expect_err("an unknown budget key is refused");
    assert!(err.contains("daily_cap"), "{err}");
}

/// `TICKETFLOW__A__B_C` → `a.b_c`.
fn key_of(var: &str) -> String {
    var.trim_start_matches("TICKETFLOW__").split("__").map(str::to_lowercase).collect::<Vec<_>>().join(".")
}

/// A variable README.md names, with the value it gives (`VAR=value`) if any.
struct Variable {
    name: String,
    value: Option<String>,
}

/// Variables set together, from the line the first is named on.
struct Group {
    line: usize,
    vars: Vec<Variable>,
}

/// Every `TICKETFLOW__…` variable README.md names, grouped as they would be set
/// together: the variables of one code block (one shell) form a group, until one comes
/// back with another value; a variable in prose is a group of its own.
fn variable_groups(readme: &str) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut in_code = false;
    let mut block_group: Option<usize> = None;
    for (n, line) in readme.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            block_group = None;
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("TICKETFLOW__") {
            let tail = &rest[at..];
            let name_len =
                tail.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..name_len];
            let value = tail[name_len..].strip_prefix('=').map(|v| {
                let end = v.find(|c: char| c.is_whitespace() || "`)\"'".contains(c)).unwrap_or(v.len());
                v[..end].to_owned()
            });
            rest = &tail[name_len..];
            if name.len() == "TICKETFLOW__".len() || NOTATIONS.contains(&name) {
                continue;
            }
            let var = Variable { name: name.to_owned(), value };
            let clash = |g: &Group| g.vars.iter().any(|v| v.name == var.name && v.value != var.value);
            match block_group {
                Some(i) if in_code && !clash(&groups[i]) => groups[i].vars.push(var),
                _ => {
                    groups.push(Group { line: n + 1, vars: vec![var] });
                    block_group = in_code.then_some(groups.len() - 1);
                }
            }
        }
    }
    groups
}

/// The value at dotted `path` of the file, as a string an environment variable holds.
fn default_as_string(file: &toml::Table, path: &str) -> Option<String> {
    let mut parts = path.split('.');
    let mut value = file.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) => Some(value.to_string()),
        _ => None,
    }
}

fn json_at<'a>(json: &'a Json, path: &str) -> Option<&'a Json> {
    path.split('.').try_fold(json, |j, part| j.get(part))
}

fn landed(json: &Json, value: &str) -> bool {
    match json {
        Json::String(s) => s == value,
        Json::Number(n) => value.parse::<f64>().is_ok_and(|v| n.as_f64() == Some(v)),
        Json::Bool(b) => value.parse::<bool>() == Ok(*b),
        _ => false,
    }
}

#[test]
fn every_ticketflow_variable_in_the_readme_names_a_configuration_key() {
    let readme = read("README.md");
    let file = default_toml();
    let groups = variable_groups(&readme);
    let named: BTreeSet<&str> = groups.iter().flat_map(|g| g.vars.iter().map(|v| v.name.as_str())).collect();
    assert!(named.len() >= 10, "only {} variables found in README.md: {named:?}", named.len());
    let mut problems = Vec::new();
    for Group { line, vars } in &groups {
        let mut env = BTreeMap::new();
        for Variable { name, value } in vars {
            // Without a value in the README, the default's own (the variable must still
            // name a key: an unknown key is an error whatever its value).
            match value.clone().or_else(|| default_as_string(&file, &key_of(name))) {
                Some(v) => {
                    env.insert(name.clone(), v);
                }
                None => problems.push(format!(
                    "README.md:{line}: {name} gives no value and `{}` is no key of config/default.toml",
                    key_of(name)
                )),
            }
        }
        let settings = match ticketflow::policy::load_from(None, &env) {
            Ok(settings) => settings,
            Err(e) => {
                problems.push(format!("README.md:{line}: {env:?}: {e}"));
                continue;
            }
        };
        let json = serde_json::to_value(&settings).unwrap();
        for (var, value) in &env {
            let key = key_of(var);
            match json_at(&json, &key) {
                Some(j) if landed(j, value) => {}
                Some(j) => problems.push(format!("README.md:{line}: {var}={value} left `{key}` at {j}")),
                None => problems.push(format!("README.md:{line}: {var} sets `{key}`, which the settings do not have")),
            }
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn the_metrics_table_lists_every_family_with_its_type_and_labels() {
    use ticketflow::telemetry::{Kind, FAMILIES};
    let readme = read("README.md");
    let rows = table_under(&readme, "### Metrics");
    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for (line, row) in &rows {
        let [name, kind, labels, _what] = &row[..] else {
            problems.push(format!("README.md:{line}: {} cells, not 4", row.len()));
            continue;
        };
        let name = code(name).unwrap_or(name);
        listed.insert(name.to_owned());
        let Some(family) = FAMILIES.iter().find(|f| f.name == name) else {
            problems.push(format!("README.md:{line}: `{name}` is not in telemetry::FAMILIES"));
            continue;
        };
        let expected = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        if kind != expected {
            problems.push(format!("README.md:{line}: `{name}` is a {expected}, the table says {kind}"));
        }
        let labels: Vec<&str> = labels.split(',').map(str::trim).filter(|l| !l.is_empty()).collect();
        if labels != family.labels {
            problems
                .push(format!("README.md:{line}: `{name}` has labels {:?}, the table says {labels:?}", family.labels));
        }
    }
    for family in FAMILIES.iter().filter(|f| !listed.contains(f.name)) {
        problems.push(format!("`{}` is not in README.md's metrics table", family.name));
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}
