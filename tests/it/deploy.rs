//! The container image, `docker-compose.yml`, and the Prometheus and Grafana
//! provisioning under `deploy/`, checked by reading them. No container engine runs
//! where the tests run, so these tests hold the files to what the binary really is:
//! its commands (parsed by its own CLI), its configuration keys (loaded by its own
//! settings loader), its mock provider's routes and its metric families
//! (`ticketflow::telemetry::FAMILIES`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::Parser as _;
use serde_json::Value as Json;
use serde_norway::Value;
use ticketflow::cli::{Cli, Command};
use ticketflow::mock_provider::{MockConfig, Style};
use ticketflow::settings::{BrokerKind, ProviderKind, Settings};
use ticketflow::telemetry::{Kind, FAMILIES};

use crate::helpers::repo_path;

/// Every service of the stack.
const SERVICES: [&str; 9] =
    ["kafka", "rabbitmq", "postgres", "mock-provider", "migrate", "worker", "producer", "prometheus", "grafana"];

/// The providers of the shipped configuration and the adapter kind
/// `config/production.toml` gives each.
const PROVIDERS: [(&str, ProviderKind); 5] = [
    ("qwen", ProviderKind::Dashscope),
    ("openai", ProviderKind::Openai),
    ("anthropic", ProviderKind::Anthropic),
    ("mistral", ProviderKind::Openai),
    ("deepseek", ProviderKind::Openai),
];

// ---------------------------------------------------------------------------------
// Reading the files

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A YAML file with its `<<` merge keys applied, as Compose reads it.
fn yaml(rel: &str) -> Value {
    let mut value: Value = serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    value.apply_merge().unwrap_or_else(|e| panic!("{rel}: {e}"));
    value
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose["services"].get(name).unwrap_or_else(|| panic!("docker-compose.yml has no service `{name}`"))
}

/// A scalar as Compose passes it on: numbers and booleans as their text.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// A list of strings (exec form), or one string split on whitespace.
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items.iter().map(scalar).collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Value::Null => Vec::new(),
        other => panic!("not a command: {other:?}"),
    }
}

/// Compose's variable interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`,
/// `${VAR-default}`, `${VAR:?message}` and `${VAR?message}`, with `shell` as the
/// environment `docker compose` runs in.
fn interpolate(text: &str, shell: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {text:?}"));
            let expr = &body[..end];
            let name_end = expr.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len());
            let (name, modifier) = expr.split_at(name_end);
            let value = shell.get(name).copied();
            out.push_str(&match modifier {
                "" => value.unwrap_or_default().to_owned(),
                m if m.starts_with(":-") => value.filter(|v| !v.is_empty()).unwrap_or(&m[2..]).to_owned(),
                m if m.starts_with('-') => value.unwrap_or(&m[1..]).to_owned(),
                m if m.starts_with(":?") || m.starts_with('?') => {
                    value.unwrap_or_else(|| panic!("{name} must be set: {text:?}")).to_owned()
                }
                m => panic!("unsupported interpolation ${{{name}{m}}} in {text:?}"),
            });
            rest = &body[end + 1..];
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            out.push_str(shell.get(&after[..end]).copied().unwrap_or_default());
            rest = &after[end..];
        }
    }
    out.push_str(rest);
    out
}

/// A service's environment (map or `KEY=value` list form), interpolated.
fn environment(svc: &Value, shell: &BTreeMap<&str, &str>) -> BTreeMap<String, String> {
    let raw: Vec<(String, String)> = match &svc["environment"] {
        Value::Mapping(m) => m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Value::Null => Vec::new(),
        other => panic!("environment is neither a map nor a list: {other:?}"),
    };
    raw.into_iter().map(|(k, v)| (k, interpolate(&v, shell))).collect()
}

/// `depends_on` in its long form: dependency -> condition.
fn depends_on(svc: &Value) -> BTreeMap<String, String> {
    match &svc["depends_on"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let condition = v.get("condition").map(scalar).unwrap_or_else(|| "service_started".into());
                (scalar(k), condition)
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("depends_on must be the long form, with conditions: {other:?}"),
    }
}

/// Published ports, short syntax: (host ip, host port, container port).
fn ports(svc: &Value) -> Vec<(String, u16, u16)> {
    words(&svc["ports"])
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split(':').collect();
            let [ip, host, container] = parts[..] else {
                panic!("published port {p:?} must be IP:HOST:CONTAINER, bound to an address")
            };
            (ip.to_owned(), host.parse().unwrap(), container.trim_end_matches("/tcp").parse().unwrap())
        })
        .collect()
}

/// Volume mounts, short syntax: (source, target).
fn mounts(svc: &Value) -> Vec<(String, String)> {
    words(&svc["volumes"])
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            (parts[0].to_owned(), parts.get(1).unwrap_or_else(|| panic!("volume {v:?} has no target")).to_string())
        })
        .collect()
}

/// Where a service mounts the repository path `source` (`./deploy/...`).
fn mount_target(svc: &Value, source: &str) -> String {
    mounts(svc)
        .into_iter()
        .find(|(s, _)| s.trim_start_matches("./") == source)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("nothing mounts ./{source}"))
}

/// The URL a healthcheck (`["CMD", "curl"|"wget", ..., URL]`) requests.
fn healthcheck_url(name: &str, svc: &Value) -> reqwest::Url {
    let test = words(&svc["healthcheck"]["test"]);
    let url = test.iter().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("{name}: no URL in {test:?}"));
    reqwest::Url::parse(url).unwrap()
}

fn port_of(listen: &str) -> u16 {
    listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("no port in {listen:?}"))
}

/// The services that run the ticketflow image.
fn image_services(compose: &Value) -> Vec<String> {
    let image = scalar(&service(compose, "worker")["image"]);
    compose["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, svc)| scalar(&svc["image"]) == image || svc.get("build").is_some())
        .map(|(name, _)| scalar(name))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The ticketflow command lines a service runs (through `sh -c` when its entrypoint
/// is a shell), as argument vectors starting with `ticketflow`.
fn ticketflow_commands(svc: &Value) -> Vec<Vec<String>> {
    let entrypoint = words(&svc["entrypoint"]);
    let command = words(&svc["command"]);
    match entrypoint.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => vec![[vec!["ticketflow".to_owned()], command].concat()],
        ["/bin/sh", "-c"] | ["sh", "-c"] => {
            let script = match &svc["command"] {
                Value::Sequence(items) => scalar(&items[0]),
                other => scalar(other),
            };
            script.split("&&").map(|c| c.split_whitespace().map(str::to_owned).collect()).collect()
        }
        ref other => panic!("unexpected entrypoint {other:?}"),
    }
}

/// The effective settings of a service, loaded by ticketflow's own loader from the
/// service's environment: unknown keys and invalid values fail here.
fn settings_of(name: &str, svc: &Value, shell: &BTreeMap<&str, &str>) -> Settings {
    let env = environment(svc, shell);
    ticketflow::policy::load_from(None, &env).unwrap_or_else(|e| panic!("{name} (shell {shell:?}): {e}"))
}

// ---------------------------------------------------------------------------------
// Dockerfile

#[derive(Debug)]
struct Stage {
    base: String,
    name: Option<String>,
    /// (INSTRUCTION, arguments), continuation lines joined.
    instructions: Vec<(String, String)>,
}

impl Stage {
    fn all<'a>(&'a self, instruction: &'a str) -> impl Iterator<Item = &'a str> {
        self.instructions.iter().filter(move |(i, _)| i == instruction).map(|(_, a)| a.as_str())
    }

    /// `COPY [--flags] SRC... DEST` whose first source is `source`: its destination.
    fn copy_destination(&self, source: &str) -> Option<String> {
        self.all("COPY").find_map(|args| {
            let parts: Vec<&str> = args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            (parts.first() == Some(&source)).then(|| parts.last().unwrap().to_string())
        })
    }

    /// `ENV KEY=value` or `ENV KEY value`.
    fn env(&self, key: &str) -> Option<String> {
        self.all("ENV").find_map(|args| {
            args.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_owned)).or_else(|| {
                let (k, v) = args.split_once(char::is_whitespace)?;
                (k == key && !v.contains('=')).then(|| v.trim().to_owned())
            })
        })
    }
}

fn dockerfile() -> Vec<Stage> {
    let text = read("Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.is_empty()) {
        let (instruction, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let (instruction, args) = (instruction.to_uppercase(), args.trim().to_owned());
        if instruction == "FROM" {
            let parts: Vec<&str> = args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let name = match parts[..] {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_owned()),
                _ => None,
            };
            stages.push(Stage { base: parts[0].to_owned(), name, instructions: Vec::new() });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push((instruction, args));
        }
    }
    stages
}

/// The Debian release of an image tag: `rust:1.95-bookworm`, `debian:bookworm-slim`.
fn debian_release(image: &str) -> &str {
    let tag = image.split_once(':').map_or("", |(_, t)| t);
    tag.split('-').find(|part| ["bullseye", "bookworm", "trixie"].contains(part)).unwrap_or("")
}

// ---------------------------------------------------------------------------------
// PromQL

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Open,
    Close,
    BraceOpen,
    BraceClose,
    Other,
}

/// Tokens of a PromQL expression; strings, numbers and `[...]` ranges become `Other`.
fn tokens(expr: &str) -> Vec<Tok> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push(Tok::Other);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            out.push(Tok::Other);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' || c == '$' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._$".contains(chars[i])) {
                i += 1;
            }
            out.push(Tok::Other);
        } else {
            out.push(match c {
                '(' => Tok::Open,
                ')' => Tok::Close,
                '{' => Tok::BraceOpen,
                '}' => Tok::BraceClose,
                _ => Tok::Other,
            });
            i += 1;
        }
    }
    out
}

/// Index of the parenthesis closing the one opened at `open`.
fn closing(toks: &[Tok], open: usize) -> usize {
    let mut depth = 0;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses")
}

/// Index of the parenthesis opening the one closed at `close`.
fn opening(toks: &[Tok], close: usize) -> usize {
    let mut depth = 0;
    for i in (0..=close).rev() {
        match toks[i] {
            Tok::Close => depth += 1,
            Tok::Open => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses")
}

/// Identifiers between the parenthesis at `open` and its closing one.
fn label_list(toks: &[Tok], open: usize) -> (Vec<String>, usize) {
    let close = closing(toks, open);
    let labels = toks[open + 1..close]
        .iter()
        .filter_map(|t| match t {
            Tok::Ident(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    (labels, close)
}

const KEYWORDS: [&str; 11] =
    ["by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"];

/// The labels a series of metric `name` may carry: its family's, the target labels
/// Prometheus adds (`instance`, `job`), and `le` on a histogram's buckets. `Err` when
/// `name` is no series ticketflow exports.
fn labels_of(name: &str) -> Result<BTreeSet<&'static str>, String> {
    let mut labels: BTreeSet<&'static str> = ["instance", "job"].into();
    if let Some(f) = FAMILIES.iter().find(|f| f.name == name && f.kind != Kind::Histogram) {
        labels.extend(f.labels.iter().copied());
        return Ok(labels);
    }
    for (suffix, le) in [("_bucket", true), ("_sum", false), ("_count", false)] {
        if let Some(f) = name
            .strip_suffix(suffix)
            .and_then(|base| FAMILIES.iter().find(|f| f.name == base && f.kind == Kind::Histogram))
        {
            labels.extend(f.labels.iter().copied());
            if le {
                labels.insert("le");
            }
            return Ok(labels);
        }
    }
    Err(format!("`{name}` is not a series of any family in ticketflow::telemetry::FAMILIES"))
}

/// Every problem with the metric names and labels of a PromQL expression: names that
/// are not exported series, matchers and `by (...)` / `without (...)` labels absent
/// from the series they apply to. Also returns the metric names used.
fn check_promql(expr: &str) -> (Vec<String>, BTreeSet<String>) {
    let toks = tokens(expr);
    let mut problems = Vec::new();
    // (token index, metric name)
    let mut selectors: Vec<(usize, String)> = Vec::new();
    // (labels, first token, last token) of each grouping clause's scope
    let mut groupings: Vec<(Vec<String>, usize, usize)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(word) if KEYWORDS.contains(&word.as_str()) => {
                if toks.get(i + 1) == Some(&Tok::Open) {
                    let (labels, close) = label_list(&toks, i + 1);
                    let scope = match word.as_str() {
                        // `sum by (x) (expr)`
                        "by" | "without" if matches!(toks.get(i.wrapping_sub(1)), Some(Tok::Ident(_))) => {
                            assert_eq!(toks.get(close + 1), Some(&Tok::Open), "{expr}: aggregation without argument");
                            (close + 1, closing(&toks, close + 1))
                        }
                        // `sum (expr) by (x)`
                        "by" | "without" => (opening(&toks, i - 1), i - 1),
                        // on/ignoring/group_*: both sides of the operator
                        _ => (0, toks.len() - 1),
                    };
                    groupings.push((labels, scope.0, scope.1));
                    i = close + 1;
                } else {
                    i += 1;
                }
            }
            // A function or an aggregation.
            Tok::Ident(_)
                if matches!(toks.get(i + 1), Some(Tok::Open))
                    || matches!(toks.get(i + 1), Some(Tok::Ident(k)) if k == "by" || k == "without") =>
            {
                i += 1
            }
            Tok::Ident(name) => {
                let allowed = labels_of(name);
                if let Err(e) = &allowed {
                    problems.push(e.clone());
                }
                selectors.push((i, name.clone()));
                i += 1;
                if toks.get(i) == Some(&Tok::BraceOpen) {
                    // Matchers: label, operator, string: the values are strings, so
                    // every identifier is a label.
                    while i < toks.len() && toks[i] != Tok::BraceClose {
                        if let (Tok::Ident(label), Ok(allowed)) = (&toks[i], &allowed) {
                            if !allowed.contains(label.as_str()) {
                                problems.push(format!("`{name}` has no label `{label}` (matcher)"));
                            }
                        }
                        i += 1;
                    }
                    i += 1;
                }
            }
            Tok::BraceOpen => {
                problems.push("a selector without a metric name".to_owned());
                while i < toks.len() && toks[i] != Tok::BraceClose {
                    i += 1;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    for (labels, first, last) in groupings {
        for (_, name) in selectors.iter().filter(|(at, _)| (first..=last).contains(at)) {
            let Ok(allowed) = labels_of(name) else { continue };
            for label in &labels {
                if !allowed.contains(label.as_str()) {
                    problems.push(format!("`{name}` has no label `{label}` (grouping)"));
                }
            }
        }
    }
    (problems, selectors.into_iter().map(|(_, n)| n).collect())
}

/// The family a series name belongs to (`_bucket`, `_sum`, `_count` stripped from
/// histograms).
fn family_of(series: &str) -> &'static str {
    FAMILIES
        .iter()
        .find(|f| {
            f.name == series
                || (f.kind == Kind::Histogram
                    && ["_bucket", "_sum", "_count"].iter().any(|s| series.strip_suffix(s) == Some(f.name)))
        })
        .map(|f| f.name)
        .unwrap_or("")
}

fn dashboard() -> Json {
    serde_json::from_str(&read("deploy/grafana/dashboards/ticketflow.json")).expect("dashboard JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// (panel title, expression) of every query: panel targets and query variables.
fn queries(dashboard: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{}: a target without expr", p["title"]));
            out.push((p["title"].as_str().unwrap_or_default().to_owned(), expr.to_owned()));
        }
    }
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        // Grafana runs `query` and shows `definition`: both must hold.
        let texts = [v["query"]["query"].as_str().or(v["query"].as_str()), v["definition"].as_str()];
        for query in texts.into_iter().flatten() {
            // label_values(metric, label): the series selector `metric` and one label of it.
            let args = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')'));
            let (metric, label) = args.and_then(|a| a.split_once(',')).expect("label_values(metric, label)");
            out.push((format!("variable {}", v["name"]), format!("sum by ({}) ({})", label.trim(), metric.trim())));
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// The tests

#[test]
fn compose_runs_the_whole_stack() {
    let compose = compose();
    let services: BTreeSet<String> = compose["services"].as_mapping().unwrap().keys().map(scalar).collect();
    let expected: BTreeSet<String> = SERVICES.iter().map(|s| s.to_string()).collect();
    assert_eq!(services, expected);
    let image = |name: &str| scalar(&service(&compose, name)["image"]);
    assert!(image("kafka").starts_with("apache/kafka:"), "{}", image("kafka"));
    assert_eq!(image("rabbitmq"), "rabbitmq:3.13-management");
    assert_eq!(image("postgres"), "postgres:15");
    assert!(image("prometheus").starts_with("prom/prometheus:"));
    assert!(image("grafana").starts_with("grafana/grafana:"));
    // Kafka in KRaft mode, reachable from the other containers as kafka:9092.
    let kafka = environment(service(&compose, "kafka"), &BTreeMap::new());
    assert!(kafka["KAFKA_PROCESS_ROLES"].contains("controller"), "KRaft: the node is its own controller");
    assert!(kafka["KAFKA_ADVERTISED_LISTENERS"].split(',').any(|l| l.ends_with("://kafka:9092")));
    // Named volumes are declared.
    let declared: BTreeSet<String> = compose["volumes"].as_mapping().unwrap().keys().map(scalar).collect();
    for name in SERVICES {
        for (source, _) in mounts(service(&compose, name)) {
            if !source.starts_with('.') && !source.starts_with('/') {
                assert!(declared.contains(&source), "{name}: volume {source} is not declared");
            }
        }
    }
}

#[test]
fn services_that_run_ticketflow_build_it_from_the_dockerfile_and_run_real_commands() {
    let compose = compose();
    let services = image_services(&compose);
    let expected = ["migrate", "mock-provider", "producer", "worker"];
    assert_eq!(services, expected, "the services that run the ticketflow image");
    for name in &services {
        let svc = service(&compose, name);
        assert_eq!(scalar(&svc["build"]["context"]), ".", "{name}");
        let dockerfile = svc["build"].get("dockerfile").map(scalar).unwrap_or_else(|| "Dockerfile".into());
        assert_eq!(dockerfile, "Dockerfile", "{name}");
        assert!(repo_path(&dockerfile).exists());
        assert_eq!(svc["image"], service(&compose, "worker")["image"], "{name}: one image for every service");
        for argv in ticketflow_commands(svc) {
            assert_eq!(argv[0], "ticketflow", "{name}: {argv:?}");
            if let Err(e) = Cli::try_parse_from(&argv) {
                panic!("{name}: `{}` is not a ticketflow command line: {e}", argv.join(" "));
            }
        }
    }
    let subcommand = |name: &str| -> Vec<String> {
        ticketflow_commands(service(&compose, name)).iter().map(|argv| argv[1].clone()).collect()
    };
    assert_eq!(subcommand("migrate"), ["migrate", "topics"]);
    assert_eq!(subcommand("worker"), ["worker"]);
    assert_eq!(subcommand("producer"), ["produce"]);
    assert_eq!(subcommand("mock-provider"), ["mock-provider"]);
}

#[test]
fn the_worker_scales_and_is_health_checked_on_readyz_at_its_listen_address() {
    let compose = compose();
    let worker = service(&compose, "worker");
    for fixed in ["container_name", "ports", "hostname"] {
        assert!(worker.get(fixed).is_none(), "worker: `{fixed}` would stop `--scale worker=N`");
    }
    let settings = settings_of("worker", worker, &BTreeMap::new());
    let listen = &settings.http.listen;
    assert!(listen.starts_with("0.0.0.0:"), "the worker must listen beyond its own loopback: {listen}");
    let url = healthcheck_url("worker", worker);
    assert_eq!(url.path(), "/readyz");
    assert_eq!(url.port(), Some(port_of(listen)), "the healthcheck asks another port than http.listen");
    assert!(matches!(url.host_str(), Some("127.0.0.1" | "localhost")));
    // Compose keeps a worker that drains for its whole --drain-timeout-secs (30 s).
    let grace = scalar(&worker["stop_grace_period"]);
    assert!(grace.trim_end_matches('s').parse::<u64>().unwrap() > 30, "stop_grace_period {grace}");
}

#[test]
fn dependencies_wait_for_healthy_services_and_for_the_migration() {
    let compose = compose();
    let deps = |name: &str| depends_on(service(&compose, name));
    let expect = |name: &str, pairs: &[(&str, &str)]| {
        let got = deps(name);
        for (dep, condition) in pairs {
            assert_eq!(got.get(*dep).map(String::as_str), Some(*condition), "{name} -> {dep}: {got:?}");
        }
    };
    expect(
        "migrate",
        &[("postgres", "service_healthy"), ("kafka", "service_healthy"), ("rabbitmq", "service_healthy")],
    );
    expect("worker", &[("migrate", "service_completed_successfully"), ("mock-provider", "service_healthy")]);
    expect("producer", &[("migrate", "service_completed_successfully")]);
    assert_eq!(scalar(&service(&compose, "migrate")["restart"]), "no");
    assert_eq!(words(&service(&compose, "producer")["profiles"]), ["feed"], "the producer runs only when asked");

    let services = compose["services"].as_mapping().unwrap();
    let in_default_profile = |svc: &Value| svc.get("profiles").is_none();
    for (name, svc) in services {
        let name = scalar(name);
        for (dep, condition) in depends_on(svc) {
            let target = service(&compose, &dep);
            match condition.as_str() {
                "service_healthy" => assert!(target.get("healthcheck").is_some(), "{name} waits for {dep}'s health"),
                "service_completed_successfully" => {
                    assert_eq!(scalar(&target["restart"]), "no", "{name} waits for one-shot {dep} to end")
                }
                "service_started" => {}
                other => panic!("{name} -> {dep}: unknown condition {other}"),
            }
            if in_default_profile(svc) {
                assert!(in_default_profile(target), "{name} depends on {dep}, which starts only with a profile");
            }
        }
    }
    // `docker compose up --wait` fails on a one-shot service that exits, unless a
    // long-running service waits for its successful end.
    for (name, _) in services.iter().filter(|(_, s)| in_default_profile(s) && scalar(&s["restart"]) == "no") {
        let name = scalar(name);
        let adopted = services.iter().any(|(_, other)| {
            scalar(&other["restart"]) != "no"
                && in_default_profile(other)
                && depends_on(other).get(&name).map(String::as_str) == Some("service_completed_successfully")
        });
        assert!(adopted, "one-shot `{name}` is waited for by no long-running service: `up --wait` would fail");
    }
}

#[test]
fn every_ticketflow_variable_names_a_real_configuration_key() {
    let compose = compose();
    let shells: [BTreeMap<&str, &str>; 3] =
        [BTreeMap::new(), [("TICKETFLOW_BROKER", "kafka")].into(), [("TICKETFLOW_BROKER", "rabbitmq")].into()];
    let mut checked = 0;
    for (name, svc) in compose["services"].as_mapping().unwrap() {
        let name = scalar(name);
        let env = environment(svc, &BTreeMap::new());
        if !env.keys().any(|k| k.starts_with("TICKETFLOW__")) {
            continue;
        }
        assert_eq!(env.get("TICKETFLOW_ENV").map(String::as_str), Some("production"), "{name}");
        for shell in &shells {
            settings_of(&name, svc, shell);
        }
        checked += 1;
    }
    assert_eq!(checked, 3, "migrate, worker and producer are configured by TICKETFLOW__ variables");
    // The broker is chosen when compose runs, RabbitMQ unless TICKETFLOW_BROKER says otherwise.
    let worker = service(&compose, "worker");
    assert_eq!(settings_of("worker", worker, &BTreeMap::new()).broker.kind, BrokerKind::Rabbitmq);
    assert_eq!(settings_of("worker", worker, &shells[1]).broker.kind, BrokerKind::Kafka);
}

#[test]
fn providers_point_at_the_mock_with_their_real_adapters() {
    let compose = compose();
    let mock = service(&compose, "mock-provider");
    let argv = &ticketflow_commands(mock)[0];
    let Command::MockProvider { listen, .. } = Cli::try_parse_from(argv).unwrap().command else {
        panic!("mock-provider runs {argv:?}")
    };
    let mock_port = port_of(&listen);
    assert!(listen.starts_with("0.0.0.0:"), "the mock must be reachable from the workers: {listen}");
    assert_eq!(healthcheck_url("mock-provider", mock).port(), Some(mock_port));
    let served = MockConfig::default().providers;
    for name in ["migrate", "worker", "producer"] {
        let svc = service(&compose, name);
        let env = environment(svc, &BTreeMap::new());
        let settings = settings_of(name, svc, &BTreeMap::new());
        for (provider, kind) in PROVIDERS {
            let p = &settings.providers[provider];
            assert_eq!(p.kind, kind, "{name}: {provider}");
            assert_eq!(p.base_url, format!("http://mock-provider:{mock_port}/{provider}/v1"), "{name}: {provider}");
            // The mock speaks the provider's wire style under /<name>/v1.
            let style = served.get(provider).unwrap_or_else(|| panic!("the mock does not serve {provider}")).style;
            let expected = match kind {
                ProviderKind::Dashscope => Style::Dashscope,
                ProviderKind::Anthropic => Style::Anthropic,
                _ => Style::Openai,
            };
            assert_eq!(style, expected, "{provider}");
            // The adapter refuses to start without a key; the mock wants one sent.
            let key = env.get(&p.api_key_env).map(String::as_str).unwrap_or_default();
            assert!(!key.trim().is_empty(), "{name}: {} (key of {provider}) is not set", p.api_key_env);
        }
        assert_eq!(settings.providers.len(), PROVIDERS.len(), "{name}");
    }
}

#[test]
fn databases_and_brokers_are_addressed_as_their_services_serve_them() {
    let compose = compose();
    let settings = settings_of("worker", service(&compose, "worker"), &BTreeMap::new());

    let postgres = environment(service(&compose, "postgres"), &BTreeMap::new());
    let db = reqwest::Url::parse(&settings.database.url).unwrap();
    assert_eq!((db.host_str(), db.port()), (Some("postgres"), Some(5432)));
    assert_eq!(db.username(), postgres["POSTGRES_USER"]);
    assert_eq!(db.path().trim_start_matches('/'), postgres["POSTGRES_DB"]);
    assert_eq!(postgres["POSTGRES_HOST_AUTH_METHOD"], "trust", "the URL carries no password");

    let rabbitmq = environment(service(&compose, "rabbitmq"), &BTreeMap::new());
    let amqp = reqwest::Url::parse(&settings.broker.rabbitmq.url).unwrap();
    assert_eq!((amqp.host_str(), amqp.port()), (Some("rabbitmq"), Some(5672)));
    assert_eq!(amqp.username(), rabbitmq["RABBITMQ_DEFAULT_USER"]);
    assert_eq!(amqp.password(), Some(rabbitmq["RABBITMQ_DEFAULT_PASS"].as_str()));

    let kafka = environment(service(&compose, "kafka"), &BTreeMap::new());
    let advertised: Vec<&str> =
        kafka["KAFKA_ADVERTISED_LISTENERS"].split(',').filter_map(|l| l.split_once("://").map(|(_, a)| a)).collect();
    for server in settings.broker.kafka.bootstrap_servers.split(',') {
        assert!(advertised.contains(&server.trim()), "{server} is not an advertised listener: {advertised:?}");
    }
}

#[test]
fn local_development_ports_stay_published_on_loopback_only() {
    let compose = compose();
    let published = |name: &str| ports(service(&compose, name));
    assert!(published("postgres").contains(&("127.0.0.1".into(), 5432, 5432)));
    assert!(published("rabbitmq").contains(&("127.0.0.1".into(), 5672, 5672)));
    assert!(published("rabbitmq").contains(&("127.0.0.1".into(), 15672, 15672)));
    let mut host_ports = BTreeSet::new();
    for name in SERVICES {
        for (ip, host, _) in published(name) {
            assert_eq!(ip, "127.0.0.1", "{name} publishes port {host} beyond this machine");
            assert!(host_ports.insert(host), "host port {host} is published twice");
        }
    }
    // A worker run outside Docker serves 127.0.0.1:9090 by default (config/default.toml).
    let defaults = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
    assert!(!host_ports.contains(&port_of(&defaults.http.listen)), "a published port clashes with a local worker");
}

#[test]
fn prometheus_scrapes_every_worker_replica_through_docker_dns() {
    let compose = compose();
    let prom_svc = service(&compose, "prometheus");
    let args = words(&prom_svc["command"]);
    let config_file = args.iter().find_map(|a| a.strip_prefix("--config.file=")).expect("--config.file");
    assert_eq!(mount_target(prom_svc, "deploy/prometheus/prometheus.yml"), config_file);

    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    let worker = settings_of("worker", service(&compose, "worker"), &BTreeMap::new());
    let jobs = prometheus["scrape_configs"].as_sequence().expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| {
            j["dns_sd_configs"]
                .as_sequence()
                .is_some_and(|sds| sds.iter().any(|sd| words(&sd["names"]).contains(&"worker".to_owned())))
        })
        .expect("a scrape job that finds the `worker` service by DNS");
    let sd = &job["dns_sd_configs"][0];
    assert_eq!(words(&sd["names"]), ["worker"]);
    assert_eq!(scalar(&sd["type"]), "A", "one A record per replica");
    assert_eq!(scalar(&sd["port"]), port_of(&worker.http.listen).to_string(), "the worker's http.listen port");
    assert_eq!(job.get("metrics_path").map(scalar).unwrap_or_else(|| "/metrics".into()), "/metrics");
}

#[test]
fn grafana_reads_the_provisioned_prometheus_and_dashboard() {
    let compose = compose();
    let grafana = service(&compose, "grafana");
    let prometheus = service(&compose, "prometheus");
    let prom_port = words(&prometheus["command"])
        .iter()
        .find_map(|a| a.strip_prefix("--web.listen-address=").map(port_of))
        .unwrap_or(9090);

    assert_eq!(
        mount_target(grafana, "deploy/grafana/provisioning/datasources"),
        "/etc/grafana/provisioning/datasources"
    );
    assert_eq!(mount_target(grafana, "deploy/grafana/provisioning/dashboards"), "/etc/grafana/provisioning/dashboards");

    let mut datasources = Vec::new();
    for entry in std::fs::read_dir(repo_path("deploy/grafana/provisioning/datasources")).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(repo_path("")).unwrap().to_str().unwrap().to_owned();
        datasources.extend(yaml(&rel)["datasources"].as_sequence().cloned().into_iter().flatten());
    }
    let [ds] = &datasources[..] else { panic!("one datasource expected: {datasources:?}") };
    assert_eq!(scalar(&ds["type"]), "prometheus");
    let url = reqwest::Url::parse(&scalar(&ds["url"])).unwrap();
    assert_eq!((url.host_str(), url.port_or_known_default()), (Some("prometheus"), Some(prom_port)));
    // $__rate_interval is sound only when Grafana knows the scrape interval.
    let scrape_interval = scalar(&yaml("deploy/prometheus/prometheus.yml")["global"]["scrape_interval"]);
    assert_eq!(scalar(&ds["jsonData"]["timeInterval"]), scrape_interval);
    let uid = scalar(&ds["uid"]);

    let providers = yaml("deploy/grafana/provisioning/dashboards/ticketflow.yml");
    let path = scalar(&providers["providers"][0]["options"]["path"]);
    assert_eq!(mount_target(grafana, "deploy/grafana/dashboards"), path);
    let home = environment(grafana, &BTreeMap::new())["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].clone();
    let home = Path::new(&home).strip_prefix(&path).expect("the home dashboard is a provisioned one");
    assert!(repo_path("deploy/grafana/dashboards").join(home).exists(), "{}", home.display());
    let anonymous = environment(grafana, &BTreeMap::new());
    assert_eq!(anonymous["GF_AUTH_ANONYMOUS_ENABLED"], "true");
    assert_eq!(anonymous["GF_AUTH_ANONYMOUS_ORG_ROLE"], "Viewer");

    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "ticketflow");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let mut ids = BTreeSet::new();
    for p in panels(&dashboard) {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "{title}: duplicate panel id");
        match p["type"].as_str().unwrap() {
            "row" => continue,
            "timeseries" | "stat" | "table" => {}
            other => panic!("{title}: panel type {other}"),
        }
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets.iter().chain([p]) {
            assert_eq!(t["datasource"]["uid"].as_str(), Some(uid.as_str()), "{title}: not the provisioned datasource");
        }
    }
}

#[test]
fn dashboard_queries_only_exported_metrics_and_their_labels() {
    let dashboard = dashboard();
    let queries = queries(&dashboard);
    assert!(queries.len() > 20);
    let mut problems = Vec::new();
    let mut families = BTreeSet::new();
    for (title, expr) in &queries {
        let (found, names) = check_promql(expr);
        problems.extend(found.into_iter().map(|p| format!("{title}: {p} in {expr}")));
        families.extend(names.iter().map(|n| family_of(n)));
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // And every family is on the dashboard: a metric nobody graphs is one nobody sees.
    let missing: Vec<&str> = FAMILIES.iter().map(|f| f.name).filter(|n| !families.contains(n)).collect();
    assert!(missing.is_empty(), "families on no panel: {missing:?}");
}

#[test]
fn the_promql_check_catches_unknown_names_and_labels() {
    let ok = |e: &str| assert_eq!(check_promql(e).0, Vec::<String>::new(), "{e}");
    let bad = |e: &str, what: &str| {
        let (problems, _) = check_promql(e);
        assert!(problems.iter().any(|p| p.contains(what)), "{e}: {problems:?}");
    };
    ok(r#"sum by (outcome) (rate(ticketflow_tickets_total{instance=~"$instance", outcome!="x"}[$__rate_interval]))"#);
    ok("histogram_quantile(0.95, sum by (tier, le) (rate(ticketflow_ticket_latency_seconds_bucket[5m])))");
    ok("sum(increase(ticketflow_baseline_cost_usd[$__range])) - sum(increase(ticketflow_cost_usd[$__range]))");
    ok("sum(rate(ticketflow_dead_letters_total[5m])) by (kind)");
    bad("sum(rate(ticketflow_tickets_totl[5m]))", "`ticketflow_tickets_totl` is not a series");
    bad("up", "`up` is not a series");
    bad("ticketflow_ticket_latency_seconds", "is not a series");
    bad("ticketflow_in_flight_count", "is not a series");
    bad("sum by (kind) (rate(ticketflow_tickets_total[5m]))", "no label `kind` (grouping)");
    bad("sum(rate(ticketflow_dead_letters_total[5m])) by (tier)", "no label `tier` (grouping)");
    bad(r#"ticketflow_queue_depth{topic="tickets"}"#, "no label `topic` (matcher)");
    bad("sum by (le) (rate(ticketflow_tickets_total[5m]))", "no label `le`");
    bad(r#"{__name__="ticketflow_ready"}"#, "without a metric name");
}

#[test]
fn the_image_builds_in_stages_runs_unprivileged_and_carries_its_configuration() {
    let stages = dockerfile();
    assert!(stages.len() >= 2, "multi-stage: a builder and a runtime");
    let (builder, runtime) = (&stages[0], stages.last().unwrap());
    assert!(builder.base.starts_with("rust:"), "{}", builder.base);
    assert!(runtime.base.starts_with("debian:") && runtime.base.ends_with("-slim"), "{}", runtime.base);
    assert!(!debian_release(&builder.base).is_empty());
    assert_eq!(debian_release(&builder.base), debian_release(&runtime.base), "glibc of the build = glibc of the run");
    assert!(builder.all("RUN").any(|r| r.contains("cargo build --release --locked")));

    let builder_name = builder.name.as_deref().expect("the builder stage is named");
    let binary = runtime
        .all("COPY")
        .find(|c| c.contains(&format!("--from={builder_name}")))
        .and_then(|c| c.split_whitespace().last())
        .expect("the runtime copies the binary from the builder");
    assert_eq!(binary, "/usr/local/bin/ticketflow");
    assert_eq!(runtime.all("ENTRYPOINT").last(), Some(r#"["ticketflow"]"#));
    assert_eq!(runtime.all("CMD").last(), Some(r#"["worker"]"#));

    let user = runtime.all("USER").last().expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(!["root", "0"].contains(&uid), "the image runs as root: USER {user}");

    let config = runtime.copy_destination("config").expect("COPY config");
    assert_eq!(runtime.env("TICKETFLOW_CONFIG_DIR"), Some(config.clone()), "TICKETFLOW_CONFIG_DIR names the copy");
    assert!(repo_path("config/production.toml").exists(), "TICKETFLOW_ENV=production needs config/production.toml");

    let compose = compose();
    let examples = runtime.copy_destination("examples/tickets.jsonl").expect("COPY examples/tickets.jsonl");
    let Command::Produce { input, .. } =
        Cli::try_parse_from(&ticketflow_commands(service(&compose, "producer"))[0]).unwrap().command
    else {
        panic!("the producer does not produce")
    };
    assert_eq!(input, Path::new(&examples), "the producer reads the examples the image carries");

    let worker = settings_of("worker", service(&compose, "worker"), &BTreeMap::new());
    let exposed: Vec<&str> = runtime.all("EXPOSE").flat_map(str::split_whitespace).collect();
    assert!(exposed.contains(&port_of(&worker.http.listen).to_string().as_str()), "EXPOSE {exposed:?}");

    // The health checks of the image's services use a tool the runtime installs.
    let installs: String = runtime.all("RUN").filter(|r| r.contains("apt-get install")).collect();
    for name in image_services(&compose) {
        let test = words(&service(&compose, &name)["healthcheck"]["test"]);
        if let Some(tool) = test.get(1).filter(|_| test[0] == "CMD") {
            assert!(installs.split_whitespace().any(|w| w == tool), "{name}'s healthcheck needs {tool}");
        }
    }
    // A HEALTHCHECK in the image would also apply to migrate and the mock provider.
    assert!(runtime.all("HEALTHCHECK").next().is_none(), "health checks belong to docker-compose.yml");

    // The build context keeps out target/ and keeps in everything the Dockerfile copies.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    assert!(ignored.iter().any(|p| p == "target"), ".dockerignore must keep target/ out");
    for stage in &stages {
        for copy in stage.all("COPY").filter(|c| !c.contains("--from=")) {
            let parts: Vec<&str> = copy.split_whitespace().collect();
            for source in &parts[..parts.len() - 1] {
                let top = source.trim_start_matches("./").split('/').next().unwrap();
                assert!(!ignored.iter().any(|p| p == top || p == source), ".dockerignore excludes {source}");
                assert!(repo_path(source).exists(), "COPY {source}: no such file");
            }
        }
    }
}

/// Issue 26: the compose broker has the consistent-hash exchange the input shards
/// need (`broker.rabbitmq.shards`), besides the image's own plugins.
#[test]
fn the_compose_broker_enables_the_consistent_hash_exchange() {
    let compose = compose();
    let target = mount_target(service(&compose, "rabbitmq"), "deploy/rabbitmq/enabled_plugins");
    assert_eq!(target, "/etc/rabbitmq/enabled_plugins");
    let plugins = read("deploy/rabbitmq/enabled_plugins");
    for plugin in ["rabbitmq_consistent_hash_exchange", "rabbitmq_management", "rabbitmq_prometheus"] {
        assert!(plugins.contains(plugin), "{plugins}");
    }
    assert!(plugins.trim_end().ends_with("]."), "an Erlang term ending in a full stop: {plugins}");
}
