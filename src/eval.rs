//! `ticketflow eval FILE|-`: the routing policy measured on labelled tickets (SPEC
//! §2). Each line is a ticket with a `label`: the expected route (`expected_tier`: a
//! tier or `human`) and, optionally, the expected triage fields (`category`,
//! `complexity`, `sentiment`, `language`, `risk`). Every ticket is triaged (by the
//! local heuristics, or by the triage chain with `--triage model`) and routed by the
//! configured policy and, with `--compare OTHER.toml`, by a second one on the same
//! triage. The report: route accuracy and the confusion of routes; the recall of
//! every must-escalate class (human, premium, empathy, specialist = code and
//! multilingual); the over-escalation rate (tickets the labels put on the cheap tier
//! that went anywhere else); triage accuracy per field and source; and the
//! estimated reply spend against the all-premium baseline (one premium reply per
//! answered ticket). `[eval]` floors make it fail (exit 1) for CI of a policy.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::explain::route_under;
use crate::intake;
use crate::pipeline::Pipeline;
use crate::providers::pricing::PriceTable;
use crate::settings::{EvalSettings, Settings};
use crate::ticket::Ticket;
use crate::triage::{Analyzer, Signals, Source, Triage};

/// Who triages the tickets (`--triage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TriageBy {
    /// The local heuristics alone: no model, no key, no cost.
    Heuristic,
    /// The triage chain, with the pipeline's refusal handling.
    Model,
}

/// The label of a ticket.
#[derive(Debug, Clone, Deserialize)]
struct Label {
    #[serde(alias = "route")]
    expected_tier: String,
    category: Option<String>,
    complexity: Option<String>,
    sentiment: Option<String>,
    language: Option<String>,
    risk: Option<String>,
}

#[derive(Deserialize)]
struct Labelled {
    label: Label,
}

/// The must-escalate class of a route: code and multilingual are both specialists.
pub fn class_of(route: &str) -> &str {
    match route {
        "code" | "multilingual" => "specialist",
        other => other,
    }
}

/// The must-escalate classes, in report order.
pub const ESCALATION_CLASSES: [&str; 4] = ["human", "premium", "empathy", "specialist"];

/// How one policy did on the labelled tickets.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyReport {
    pub tickets: u64,
    pub route_correct: u64,
    pub route_accuracy: f64,
    /// expected route -> routed -> tickets.
    pub confusion: BTreeMap<String, BTreeMap<String, u64>>,
    /// class -> (labelled in the class and routed to it, labelled in the class).
    pub recall: BTreeMap<String, (u64, u64)>,
    /// Tickets labelled `cheap` that went elsewhere, and tickets labelled `cheap`.
    pub over_escalated: (u64, u64),
    /// The triage calls made (`--triage model`) plus each reply estimated on its
    /// route's first model.
    #[serde(serialize_with = "crate::ticket::usd")]
    pub estimated_spend_usd: f64,
    /// One reply per answered ticket on the baseline model, estimated alike.
    #[serde(serialize_with = "crate::ticket::usd")]
    pub estimated_baseline_usd: f64,
    /// Floors this policy missed, one line each.
    pub missed: Vec<String>,
}

impl PolicyReport {
    fn add(&mut self, expected: &str, routed: &str, spend: f64, baseline: f64) {
        self.tickets += 1;
        self.route_correct += u64::from(expected == routed);
        *self.confusion.entry(expected.to_owned()).or_default().entry(routed.to_owned()).or_default() += 1;
        let class = class_of(expected);
        if ESCALATION_CLASSES.contains(&class) {
            let r = self.recall.entry(class.to_owned()).or_default();
            r.1 += 1;
            r.0 += u64::from(class_of(routed) == class);
        }
        if expected == "cheap" {
            self.over_escalated.1 += 1;
            self.over_escalated.0 += u64::from(routed != "cheap");
        }
        self.estimated_spend_usd += spend;
        self.estimated_baseline_usd += baseline;
    }

    fn finish(&mut self, floors: &EvalSettings) {
        self.route_accuracy = ratio(self.route_correct, self.tickets);
        let mut missed = Vec::new();
        if self.route_accuracy < floors.min_route_accuracy {
            missed.push(format!(
                "route accuracy {:.1}% is below eval.min_route_accuracy {:.1}%",
                self.route_accuracy * 100.0,
                floors.min_route_accuracy * 100.0
            ));
        }
        for (class, (hit, total)) in &self.recall {
            let floor = if class == "human" { floors.min_human_recall } else { floors.min_escalation_recall };
            let key = if class == "human" { "min_human_recall" } else { "min_escalation_recall" };
            if ratio(*hit, *total) < floor {
                missed.push(format!(
                    "recall of {class} {:.1}% ({hit} of {total}) is below eval.{key} {:.1}%",
                    ratio(*hit, *total) * 100.0,
                    floor * 100.0
                ));
            }
        }
        let over = ratio(self.over_escalated.0, self.over_escalated.1);
        if over > floors.max_over_escalation {
            missed.push(format!(
                "over-escalation {:.1}% is above eval.max_over_escalation {:.1}%",
                over * 100.0,
                floors.max_over_escalation * 100.0
            ));
        }
        self.missed = missed;
    }
}

/// The whole evaluation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EvalReport {
    pub triage_by: String,
    /// Lines that are not a labelled ticket, with why.
    pub rejected: Vec<String>,
    /// field -> source (`llm`, `heuristic`) -> (correct, labelled).
    pub triage_accuracy: BTreeMap<String, BTreeMap<String, (u64, u64)>>,
    pub policy: PolicyReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared: Option<PolicyReport>,
    /// Tickets the two policies route differently.
    pub routes_differ: u64,
}

impl EvalReport {
    /// Every floor missed, by either policy.
    pub fn missed(&self) -> Vec<String> {
        let mut all = self.policy.missed.clone();
        if let Some(c) = &self.compared {
            all.extend(c.missed.iter().map(|m| format!("compared policy: {m}")));
        }
        all
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Evaluates every labelled ticket of `input`.
pub async fn run(
    settings: Arc<Settings>,
    other: Option<&Settings>,
    input: &str,
    triage_by: TriageBy,
) -> anyhow::Result<EvalReport> {
    let prices = PriceTable::from_settings(&settings);
    let other_prices = other.map(PriceTable::from_settings);
    let analyzer = Analyzer::new(&settings.triage);
    let pipeline = match triage_by {
        TriageBy::Model => Some(Arc::new(Pipeline::for_explain(settings.clone())?)),
        TriageBy::Heuristic => None,
    };
    let mut report = EvalReport {
        triage_by: match triage_by {
            TriageBy::Heuristic => "heuristic".into(),
            TriageBy::Model => "model".into(),
        },
        compared: other.map(|_| PolicyReport::default()),
        ..EvalReport::default()
    };
    let lines: Vec<(usize, &str)> = input.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    for window in lines.chunks(settings.limits.max_in_flight.max(1)) {
        let mut pending = Vec::with_capacity(window.len());
        for (i, line) in window {
            let label = match serde_json::from_str::<Labelled>(line) {
                Ok(l) => l.label,
                Err(e) => {
                    report.rejected.push(format!("line {}: no usable `label` ({e})", i + 1));
                    continue;
                }
            };
            let ticket = match intake::parse(line.as_bytes(), settings.limits.max_message_bytes) {
                Ok(t) => t,
                Err(r) => {
                    report.rejected.push(format!("line {}: {} ({})", i + 1, r.message, r.kind.as_str()));
                    continue;
                }
            };
            let triaged: tokio::task::JoinHandle<(Ticket, Signals, Triage, f64)> = match &pipeline {
                Some(pipeline) => {
                    let pipeline = pipeline.clone();
                    tokio::spawn(async move {
                        let (signals, triage, calls) = pipeline.triage_ticket(&ticket).await;
                        (ticket, signals, triage, calls.total_cost())
                    })
                }
                None => {
                    let (signals, triage) = analyzer.analyze(&ticket);
                    tokio::spawn(async move { (ticket, signals, triage, 0.0) })
                }
            };
            pending.push((label, triaged));
        }
        for (label, triaged) in pending {
            let (ticket, signals, triage, triage_usd) = triaged.await?;
            score_triage(&mut report.triage_accuracy, &label, &triage);
            let route = route_under(&settings, &prices, &ticket, &triage, &signals);
            let spend = triage_usd + route.estimated_reply_usd;
            report.policy.add(&label.expected_tier, &route.target, spend, route.estimated_baseline_usd);
            if let (Some(o), Some(p), Some(c)) = (other, &other_prices, report.compared.as_mut()) {
                let r = route_under(o, p, &ticket, &triage, &signals);
                c.add(&label.expected_tier, &r.target, triage_usd + r.estimated_reply_usd, r.estimated_baseline_usd);
                report.routes_differ += u64::from(r.target != route.target);
            }
        }
    }
    report.policy.finish(&settings.eval);
    if let (Some(o), Some(c)) = (other, report.compared.as_mut()) {
        c.finish(&o.eval);
    }
    Ok(report)
}

fn score_triage(acc: &mut BTreeMap<String, BTreeMap<String, (u64, u64)>>, label: &Label, t: &Triage) {
    let source = match t.source {
        Source::Llm => "llm",
        Source::Heuristic => "heuristic",
    };
    for (field, expected, got) in [
        ("category", &label.category, &t.category),
        ("complexity", &label.complexity, &t.complexity),
        ("sentiment", &label.sentiment, &t.sentiment),
        ("language", &label.language, &t.language),
        ("risk", &label.risk, &t.risk),
    ] {
        if let Some(expected) = expected {
            let e = acc.entry(field.to_owned()).or_default().entry(source.to_owned()).or_default();
            e.1 += 1;
            e.0 += u64::from(expected == got);
        }
    }
}

/// The report as tables.
pub fn render_table(r: &EvalReport) -> String {
    use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
    let right = |v: String| Cell::new(v).set_alignment(CellAlignment::Right);
    let pct = |a: u64, b: u64| format!("{:.1}% ({a}/{b})", ratio(a, b) * 100.0);
    let mut out = String::new();
    let policies: Vec<(&str, &PolicyReport)> =
        std::iter::once(("policy", &r.policy)).chain(r.compared.as_ref().map(|c| ("compared", c))).collect();
    let mut t = Table::new();
    let mut header = vec!["figure".to_owned()];
    header.extend(policies.iter().map(|(name, _)| name.to_string()));
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    let mut rows: Vec<(String, Vec<String>)> = vec![
        ("tickets".into(), policies.iter().map(|(_, p)| p.tickets.to_string()).collect()),
        ("route accuracy".into(), policies.iter().map(|(_, p)| pct(p.route_correct, p.tickets)).collect()),
    ];
    for class in ESCALATION_CLASSES {
        rows.push((
            format!("recall: {class}"),
            policies
                .iter()
                .map(|(_, p)| p.recall.get(class).map_or("-".into(), |(hit, total)| pct(*hit, *total)))
                .collect(),
        ));
    }
    rows.push((
        "over-escalation (labelled cheap, routed elsewhere)".into(),
        policies.iter().map(|(_, p)| pct(p.over_escalated.0, p.over_escalated.1)).collect(),
    ));
    rows.push((
        "estimated spend (triage calls + replies)".into(),
        policies.iter().map(|(_, p)| format!("${:.6}", p.estimated_spend_usd)).collect(),
    ));
    rows.push((
        crate::summary::BASELINE_LABEL.into(),
        policies.iter().map(|(_, p)| format!("${:.6}", p.estimated_baseline_usd)).collect(),
    ));
    rows.push((
        "estimated savings".into(),
        policies
            .iter()
            .map(|(_, p)| {
                let saved = p.estimated_baseline_usd - p.estimated_spend_usd;
                let share = if p.estimated_baseline_usd > 0.0 { saved / p.estimated_baseline_usd * 100.0 } else { 0.0 };
                format!("${saved:.6} ({share:.1}%)")
            })
            .collect(),
    ));
    for (name, values) in rows {
        let mut cells = vec![Cell::new(name)];
        cells.extend(values.into_iter().map(right));
        t.add_row(cells);
    }
    out.push_str(&t.to_string());
    out.push('\n');
    for (name, p) in &policies {
        let routes: Vec<String> = {
            let mut all: std::collections::BTreeSet<String> = p.confusion.keys().cloned().collect();
            all.extend(p.confusion.values().flat_map(|m| m.keys().cloned()));
            all.into_iter().collect()
        };
        let mut t = Table::new();
        let mut header = vec![format!("{name}: expected \\ routed")];
        header.extend(routes.iter().cloned());
        t.load_preset(UTF8_FULL_CONDENSED).set_header(header);
        for expected in p.confusion.keys() {
            let mut cells = vec![Cell::new(expected)];
            for routed in &routes {
                let n = p.confusion[expected].get(routed).copied().unwrap_or(0);
                cells.push(right(if n == 0 { "·".into() } else { n.to_string() }));
            }
            t.add_row(cells);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["triage field", "source", "accuracy"]);
    for (field, sources) in &r.triage_accuracy {
        for (source, (hit, total)) in sources {
            t.add_row(vec![Cell::new(field), Cell::new(source), right(pct(*hit, *total))]);
        }
    }
    out.push_str(&t.to_string());
    out.push('\n');
    if r.compared.is_some() {
        out.push_str(&format!(
            "routes that differ between the policies: {} of {}\n",
            r.routes_differ, r.policy.tickets
        ));
    }
    out.push_str(&format!("triage by: {}\n", r.triage_by));
    out.push_str(crate::summary::BASELINE_NOTE);
    out.push('\n');
    out
}
