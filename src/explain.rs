//! `ticketflow explain FILE|-`: for authoring routing rules. For each ticket, the
//! local signals, the triage result (the triage model is called; reply models never
//! are), every rule with whether it matched, the route, and the estimated cost of the
//! reply. With `--compare OTHER.toml`, the same tickets and the same triage go through
//! a second policy (the configuration with OTHER.toml layered on top), and the report
//! lists the tickets whose route differs and the estimated cost of each policy.

use std::io::Write;
use std::sync::Arc;

use serde::Serialize;

use crate::intake;
use crate::pipeline::Pipeline;
use crate::providers::estimate_tokens;
use crate::providers::pricing::PriceTable;
use crate::providers::Usage;
use crate::routing::{self, Facts, RuleCheck, HUMAN};
use crate::settings::Settings;
use crate::ticket::Ticket;
use crate::triage::{prompt, Signals, Triage};

/// Output tokens assumed for a reply when estimating its cost.
pub const EXPECTED_REPLY_TOKENS: u64 = 250;

/// How one policy routes one ticket.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRoute {
    pub rules: Vec<RuleCheck>,
    pub target: String,
    pub reasons: Vec<String>,
    /// First model of the target tier's chain; `None` for a human handoff.
    pub reply_model: Option<String>,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub estimated_reply_usd: f64,
    /// The same reply on the baseline premium model (the all-premium baseline of an
    /// answered ticket); 0 for a human handoff.
    #[serde(serialize_with = "crate::ticket::usd")]
    pub estimated_baseline_usd: f64,
}

/// Everything `explain` says about one ticket.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub ticket_id: String,
    pub signals: Signals,
    pub triage: crate::ticket::TriageView,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub triage_cost_usd: f64,
    pub route: PolicyRoute,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared: Option<PolicyRoute>,
}

/// Routes a triaged ticket under `settings`' rules and prices the reply.
pub fn route_under(
    settings: &Settings,
    prices: &PriceTable,
    ticket: &Ticket,
    triage: &Triage,
    signals: &Signals,
) -> PolicyRoute {
    let facts = Facts { ticket, triage, signals };
    let (rules, decision) = routing::trace(&settings.routing.rules, &facts);
    let reply_model = (decision.target != HUMAN)
        .then(|| settings.tiers.get(&decision.target).and_then(|t| t.chain.first().cloned()))
        .flatten();
    let (estimated_reply_usd, estimated_baseline_usd) = match &reply_model {
        Some(model) => {
            let tier = &settings.tiers[&decision.target];
            let system = prompt::reply_system(
                &triage.category,
                settings.policies.get(&triage.category).map(String::as_str),
                &tier.instruction,
                &triage.language,
            );
            let usage = Usage {
                input_tokens: estimate_tokens(&system) + estimate_tokens(&prompt::ticket_data(ticket)),
                cached_input_tokens: 0,
                output_tokens: EXPECTED_REPLY_TOKENS,
            };
            let (provider, name) = model.split_once('/').unwrap_or((model.as_str(), ""));
            (prices.price(provider, name).cost(&usage), prices.baseline_cost(&usage))
        }
        None => (0.0, 0.0),
    };
    PolicyRoute {
        rules,
        target: decision.target,
        reasons: decision.reasons,
        reply_model,
        estimated_reply_usd,
        estimated_baseline_usd,
    }
}

/// Explains every ticket of `input` and writes the report to `out`.
pub async fn run(
    pipeline: Arc<Pipeline>,
    settings: &Settings,
    other: Option<&Settings>,
    input: &mut (dyn tokio::io::AsyncBufRead + Unpin + Send),
    json: bool,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let prices = PriceTable::from_settings(settings);
    let other_prices = other.map(PriceTable::from_settings);
    let (mut tickets, mut rejected, mut differ) = (0usize, 0usize, 0usize);
    let (mut cost_a, mut cost_b) = (0.0f64, 0.0f64);
    // Lines are read as they come (a line over `limits.max_message_bytes` is never
    // held whole, one that is not UTF-8 is a rejected line like any other), and triage
    // runs concurrently, a window of `limits.max_in_flight` tickets at a time; the
    // report keeps the input order.
    let (limit, window) = (settings.limits.max_message_bytes, settings.limits.max_in_flight.max(1));
    let (mut line, mut line_no, mut more) = (Vec::new(), 0usize, true);
    while more {
        let mut pending = Vec::with_capacity(window);
        while pending.len() < window {
            let Some(read) = intake::read_line(input, limit, &mut line).await? else {
                more = false;
                break;
            };
            line_no += 1;
            if intake::is_blank(&line, &read) {
                continue;
            }
            match intake::parse_cut(&line, read.full_len_if_cut(&line), limit) {
                Ok(ticket) => {
                    let pipeline = pipeline.clone();
                    pending.push(Ok(tokio::spawn(async move {
                        let (signals, triage, unit) = pipeline.triage_ticket(&ticket).await;
                        (ticket, signals, triage, unit.total_cost())
                    })));
                }
                Err(r) => pending.push(Err((line_no, r))),
            }
        }
        for item in pending {
            let (ticket, signals, triage, triage_cost_usd) = match item {
                Ok(handle) => handle.await.map_err(std::io::Error::other)?,
                Err((line_no, r)) => {
                    rejected += 1;
                    if json {
                        let v = serde_json::json!({"line": line_no, "error": {"kind": r.kind, "message": r.message}});
                        writeln!(out, "{v}")?;
                    } else {
                        writeln!(out, "line {line_no}: rejected ({}): {}\n", r.kind.as_str(), r.message)?;
                    }
                    continue;
                }
            };
            tickets += 1;
            let route = route_under(settings, &prices, &ticket, &triage, &signals);
            let compared = other.zip(other_prices.as_ref()).map(|(o, p)| route_under(o, p, &ticket, &triage, &signals));
            cost_a += route.estimated_reply_usd;
            if let Some(c) = &compared {
                cost_b += c.estimated_reply_usd;
                if c.target != route.target {
                    differ += 1;
                }
            }
            let e = Explanation {
                ticket_id: ticket.ticket_id.clone(),
                signals,
                triage: triage.view(),
                triage_cost_usd,
                route,
                compared,
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&e).map_err(std::io::Error::other)?)?;
            } else if other.is_none() || e.compared.as_ref().is_some_and(|c| c.target != e.route.target) {
                write_text(out, &e)?;
            }
        }
    }
    if !json {
        writeln!(out, "{tickets} tickets explained, {rejected} rejected")?;
        writeln!(out, "estimated reply cost (current policy): ${cost_a:.6}")?;
        if other.is_some() {
            let delta = if cost_a > 0.0 { (cost_b - cost_a) / cost_a * 100.0 } else { 0.0 };
            writeln!(out, "estimated reply cost (compared policy): ${cost_b:.6} ({delta:+.1}%)")?;
            writeln!(out, "routes that differ: {differ} of {tickets}")?;
        }
    } else if other.is_some() {
        let summary = serde_json::json!({"summary": {"tickets": tickets, "rejected": rejected, "routes_differ": differ,
            "estimated_reply_usd": cost_a, "compared_estimated_reply_usd": cost_b}});
        writeln!(out, "{summary}")?;
    }
    Ok(())
}

fn write_text(out: &mut dyn Write, e: &Explanation) -> std::io::Result<()> {
    let s = &e.signals;
    let t = &e.triage;
    writeln!(out, "{}", e.ticket_id)?;
    writeln!(
        out,
        "  signals: language={} turns={} code={} api={} shouting={} flags=[{}]",
        s.language,
        s.customer_turns,
        s.has_code,
        s.api_question,
        s.shouting,
        s.flags.iter().map(String::as_str).collect::<Vec<_>>().join(",")
    )?;
    writeln!(
        out,
        "  triage ({}): category={} complexity={} sentiment={} language={} risk={} (cost ${:.6})",
        t.source, t.category, t.complexity, t.sentiment, t.language, t.risk, e.triage_cost_usd
    )?;
    let policy = |out: &mut dyn Write, label: &str, r: &PolicyRoute| -> std::io::Result<()> {
        writeln!(out, "  {label}rules:")?;
        let mut fired = false;
        for rule in &r.rules {
            let mark = if rule.matched && !fired {
                fired = true;
                "fires"
            } else if rule.matched {
                "matches (after the first match)"
            } else {
                "no"
            };
            writeln!(out, "    {:<24} -> {:<12} {mark}", rule.name, rule.target)?;
        }
        let model = r.reply_model.as_deref().unwrap_or("none (human)");
        writeln!(out, "  {label}route: {} via {model}, estimated reply ${:.6}", r.target, r.estimated_reply_usd)
    };
    policy(out, "", &e.route)?;
    if let Some(c) = &e.compared {
        policy(out, "compared ", c)?;
    }
    writeln!(out)
}
