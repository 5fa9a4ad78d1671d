//! The labelled corpus (`tests/data/labelled_tickets.jsonl`): tickets with the triage a
//! careful human gives them and the route the default policy must choose.
//!
//! - Given the labelled triage, the default rules must agree with every expected route.
//! - With no model at all, the local heuristics' accuracy against the labels is
//!   measured and must not fall below the floors below (raise them as they improve).

use std::collections::BTreeMap;

use serde::Deserialize;
use ticketflow::routing::{self, Facts};
use ticketflow::triage::{Analyzer, Source, Triage};

use crate::helpers::repo_path;

#[derive(Deserialize)]
struct Labelled {
    ticket_id: String,
    label: Label,
}

#[derive(Deserialize)]
struct Label {
    category: String,
    complexity: String,
    sentiment: String,
    language: String,
    risk: String,
    expected_tier: String,
}

fn corpus() -> Vec<(ticketflow::ticket::Ticket, Label)> {
    let text = std::fs::read_to_string(repo_path("tests/data/labelled_tickets.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let l: Labelled = serde_json::from_str(line).unwrap();
            let t = ticketflow::intake::parse(line.as_bytes(), 256 * 1024)
                .unwrap_or_else(|e| panic!("{}: {}", l.ticket_id, e.message));
            (t, l.label)
        })
        .collect()
}

#[test]
fn the_default_policy_routes_every_labelled_ticket_as_expected() {
    let settings = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
    let analyzer = Analyzer::new(&settings.triage);
    let corpus = corpus();
    assert!(corpus.len() >= 300);
    let mut disagreements = Vec::new();
    let mut per_tier: BTreeMap<String, usize> = BTreeMap::new();
    for (ticket, label) in &corpus {
        let signals = analyzer.signals(ticket);
        let triage = Triage {
            category: label.category.clone(),
            complexity: label.complexity.clone(),
            sentiment: label.sentiment.clone(),
            language: label.language.clone(),
            risk: label.risk.clone(),
            confidence: 1.0,
            source: Source::Llm,
        };
        let decision = routing::route(&settings.routing.rules, &Facts { ticket, triage: &triage, signals: &signals });
        *per_tier.entry(label.expected_tier.clone()).or_default() += 1;
        if decision.target != label.expected_tier {
            disagreements.push(format!(
                "{}: expected {}, routed {} by {:?} (code={} api={} turns={})",
                ticket.ticket_id,
                label.expected_tier,
                decision.target,
                decision.reasons,
                signals.has_code,
                signals.api_question,
                signals.customer_turns
            ));
        }
    }
    assert!(per_tier.values().all(|n| *n >= 20) && per_tier.len() == 6, "{per_tier:?}");
    assert!(
        disagreements.is_empty(),
        "{} of {} disagree:\n{}",
        disagreements.len(),
        corpus.len(),
        disagreements.join("\n")
    );
}

#[test]
fn heuristic_fallback_accuracy() {
    let settings = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
    let analyzer = Analyzer::new(&settings.triage);
    let corpus = corpus();
    let mut hits: BTreeMap<&str, usize> = BTreeMap::new();
    let mut route_hits = 0;
    for (ticket, label) in &corpus {
        let (signals, h) = analyzer.analyze(ticket);
        for (field, ok) in [
            ("category", h.category == label.category),
            ("sentiment", h.sentiment == label.sentiment),
            ("language", h.language == label.language),
            ("risk", h.risk == label.risk),
            ("complexity", h.complexity == label.complexity),
        ] {
            *hits.entry(field).or_default() += usize::from(ok);
        }
        let decision = routing::route(&settings.routing.rules, &Facts { ticket, triage: &h, signals: &signals });
        route_hits += usize::from(decision.target == label.expected_tier);
    }
    let n = corpus.len() as f64;
    let pct = |k: usize| k as f64 / n * 100.0;
    let report: Vec<String> = hits.iter().map(|(f, k)| format!("{f} {:.1}%", pct(*k))).collect();
    println!(
        "heuristic accuracy over {} labelled tickets: {}, route {:.1}%",
        corpus.len(),
        report.join(", "),
        pct(route_hits)
    );
    // Floors: what the heuristics reach today, less a little slack.
    assert!(pct(hits["language"]) >= 98.0, "{report:?}");
    assert!(pct(hits["risk"]) >= 97.0, "{report:?}");
    assert!(pct(hits["sentiment"]) >= 80.0, "{report:?}");
    assert!(pct(route_hits) >= 90.0, "route {:.1}%", pct(route_hits));
    assert!(pct(hits["category"]) >= 55.0, "{report:?}");
}

/// Product-safety incidents (`tests/data/safety_tickets.jsonl`: overheating, smoke,
/// sparks, melting, fire, burns, swollen batteries, electric shocks, choking) in every
/// supported language, mixed Chinese-English included. When the triage model is down
/// or refuses, the heuristics decide: every one of them must still reach a person,
/// while ordinary tickets rarely raise a false alarm.
#[test]
fn the_heuristics_hand_every_product_safety_incident_to_a_person_in_every_language() {
    let settings = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
    let analyzer = Analyzer::new(&settings.triage);
    let text = std::fs::read_to_string(repo_path("tests/data/safety_tickets.jsonl")).unwrap();
    let mut misses = Vec::new();
    let mut languages: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        let labelled: serde_json::Value = serde_json::from_str(line).unwrap();
        let ticket = ticketflow::intake::parse(line.as_bytes(), 256 * 1024).unwrap();
        let (signals, h) = analyzer.analyze(&ticket);
        let language = labelled["label"]["language"].as_str().unwrap();
        *languages.entry(language.to_owned()).or_default() += 1;
        let decision =
            routing::route(&settings.routing.rules, &Facts { ticket: &ticket, triage: &h, signals: &signals });
        if h.risk != "safety" || decision.target != "human" || h.language != language {
            misses.push(format!(
                "{}: risk {}, language {} (labelled {language}), routed {}: {}",
                ticket.ticket_id, h.risk, h.language, decision.target, ticket.messages[0].text
            ));
        }
    }
    assert!(languages.len() >= 5 && languages.values().all(|n| *n >= 5), "{languages:?}");
    assert!(misses.is_empty(), "{} missed:\n{}", misses.len(), misses.join("\n"));

    // False alarms: ordinary tickets (labelled risk `none`) the heuristics flag.
    let ordinary: Vec<_> = corpus().into_iter().filter(|(_, label)| label.risk == "none").collect();
    let alarms: Vec<String> = ordinary
        .iter()
        .filter(|(ticket, _)| analyzer.analyze(ticket).1.risk != "none")
        .map(|(ticket, _)| ticket.ticket_id.clone())
        .collect();
    assert!(alarms.len() * 50 < ordinary.len(), "{} false alarms of {}: {alarms:?}", alarms.len(), ordinary.len());
}
