//! Triage: what a ticket is about, how hard and how heated it is, and in what language.
//!
//! The cheap model tier answers the triage prompt ([`prompt`]); its answer is parsed
//! defensively ([`parse`]). Local signals ([`Signals`]) are always computed, back up
//! the model's risk assessment, and decide alone ([`heuristic`]) when the model fails.

pub mod keywords;
pub mod language;
pub mod parse;
pub mod prompt;

use std::collections::BTreeSet;

use crate::settings::TriageSettings;
use crate::ticket::{Role, Ticket, TriageView};
use keywords::KeywordSet;

/// Keyword flags with a fixed meaning in triage. Operators may add more.
pub const FLAG_LEGAL: &str = "legal";
pub const FLAG_SAFETY: &str = "safety";
pub const FLAG_ANGRY: &str = "angry";
pub const FLAG_NEGATIVE: &str = "negative";
pub const FLAG_POSITIVE: &str = "positive";
pub const FLAG_API: &str = "api";

/// The triage result used by routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Triage {
    pub category: String,
    pub complexity: String,
    pub sentiment: String,
    pub language: String,
    pub risk: String,
    pub confidence: f64,
    pub source: Source,
}

/// Who decided the triage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Llm,
    Heuristic,
}

impl Triage {
    pub fn view(&self) -> TriageView {
        TriageView {
            category: self.category.clone(),
            complexity: self.complexity.clone(),
            sentiment: self.sentiment.clone(),
            language: self.language.clone(),
            risk: self.risk.clone(),
            source: match self.source {
                Source::Llm => "llm".into(),
                Source::Heuristic => "heuristic".into(),
            },
        }
    }
}

/// Local signals, computed for every ticket without any model.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Signals {
    /// ISO 639-1 code of the latest customer message.
    pub language: String,
    pub customer_turns: usize,
    pub has_code: bool,
    pub api_question: bool,
    /// Keyword flags that fired (names from `triage.keywords`).
    pub flags: BTreeSet<String>,
    /// Share of upper-case letters among cased letters of customer messages.
    pub shouting: bool,
}

/// Compiled triage configuration: keyword automatons and the category enum.
#[derive(Debug, Clone)]
pub struct Analyzer {
    pub categories: Vec<String>,
    flags: KeywordSet,
    category_words: KeywordSet,
    language: language::Detector,
}

impl Analyzer {
    pub fn new(settings: &TriageSettings) -> Self {
        let flags = KeywordSet::new(settings.keywords.iter().map(|(k, v)| (k.as_str(), v.iter())));
        // Keep the configured category order so ties resolve predictably.
        let category_words = KeywordSet::new(settings.categories.iter().map(|c| {
            let words: &[String] = settings.category_keywords.get(c).map(Vec::as_slice).unwrap_or(&[]);
            (c.as_str(), words.iter())
        }));
        // Settings::check names unknown codes; a list that slipped past it still
        // detects among the codes it knows.
        let language = language::Detector::new(&settings.latin_languages).unwrap_or_else(|_| {
            let known: Vec<String> = settings
                .latin_languages
                .iter()
                .filter(|c| language::LATIN.iter().any(|(_, k)| k == c))
                .cloned()
                .collect();
            language::Detector::new(&known).expect("only known codes")
        });
        Analyzer { categories: settings.categories.clone(), flags, category_words, language }
    }

    /// Local signals and the heuristic triage, sharing one pass over the text.
    pub fn analyze(&self, ticket: &Ticket) -> (Signals, Triage) {
        let text = customer_text(ticket);
        let lower = text.to_lowercase();
        let signals = self.signals_of(ticket, &text, &lower);
        let heuristic = self.heuristic_of(ticket, &signals, &lower);
        (signals, heuristic)
    }

    /// Computes the local signals of a ticket.
    pub fn signals(&self, ticket: &Ticket) -> Signals {
        let text = customer_text(ticket);
        self.signals_of(ticket, &text, &text.to_lowercase())
    }

    fn signals_of(&self, ticket: &Ticket, customer_text: &str, lower: &str) -> Signals {
        let flags: BTreeSet<String> = self.flags.hits(lower).map(str::to_owned).collect();
        let latest = ticket.latest_customer_text();
        Signals {
            language: self.language.detect(latest, ticket.locale.as_deref()),
            customer_turns: ticket.customer_turns(),
            has_code: looks_like_code(customer_text),
            api_question: flags.contains(FLAG_API),
            shouting: is_shouting(latest),
            flags,
        }
    }

    /// Triage decided by local signals and keyword counts alone.
    fn heuristic_of(&self, ticket: &Ticket, signals: &Signals, lower: &str) -> Triage {
        let subject = ticket.subject.as_deref().unwrap_or("").to_lowercase();
        let mut counts = self.category_words.count(lower);
        for (c, s) in counts.iter_mut().zip(self.category_words.count(&subject)) {
            *c += s;
        }
        let best = counts.iter().enumerate().filter(|(_, n)| **n > 0).max_by(|a, b| {
            // Highest count; on a tie, the category listed first in config.
            a.1.cmp(b.1).then(b.0.cmp(&a.0))
        });
        let category = match best {
            Some((i, _)) => self.category_words.groups()[i].clone(),
            None => self.fallback_category(),
        };
        let complexity = if signals.customer_turns >= 3 || signals.has_code || lower.chars().count() > 1200 {
            "complex"
        } else {
            "simple"
        };
        Triage {
            category,
            complexity: complexity.into(),
            sentiment: local_sentiment(signals).into(),
            language: signals.language.clone(),
            risk: local_risk(signals).into(),
            confidence: if best.is_some() { 0.5 } else { 0.2 },
            source: Source::Heuristic,
        }
    }

    /// `other` when configured, else the last category.
    pub fn fallback_category(&self) -> String {
        if self.categories.iter().any(|c| c == "other") {
            "other".into()
        } else {
            self.categories.last().cloned().unwrap_or_else(|| "other".into())
        }
    }
}

/// Local keyword risk backs up the model: a legal or safety keyword is never
/// overruled by a model that answered `none`.
pub fn merge_risk(model_risk: &str, signals: &Signals) -> String {
    match local_risk(signals) {
        "none" => model_risk.to_owned(),
        local if model_risk == "none" => local.to_owned(),
        _ => model_risk.to_owned(),
    }
}

fn local_risk(signals: &Signals) -> &'static str {
    if signals.flags.contains(FLAG_SAFETY) {
        "safety"
    } else if signals.flags.contains(FLAG_LEGAL) {
        "legal"
    } else {
        "none"
    }
}

fn local_sentiment(signals: &Signals) -> &'static str {
    if signals.flags.contains(FLAG_ANGRY) || signals.shouting {
        "angry"
    } else if signals.flags.contains(FLAG_NEGATIVE) {
        "negative"
    } else if signals.flags.contains(FLAG_POSITIVE) {
        "positive"
    } else {
        "neutral"
    }
}

/// All customer messages joined, which is what keywords and code detection look at.
fn customer_text(ticket: &Ticket) -> String {
    let mut out = String::new();
    for m in ticket.messages.iter().filter(|m| m.role == Role::Customer) {
        out.push_str(&m.text);
        out.push('\n');
    }
    out
}

/// Mostly capitals over a meaningful stretch of cased letters.
fn is_shouting(text: &str) -> bool {
    let (mut upper, mut cased) = (0usize, 0usize);
    for c in text.chars() {
        if c.is_uppercase() {
            upper += 1;
            cased += 1;
        } else if c.is_lowercase() {
            cased += 1;
        }
    }
    cased >= 12 && upper * 10 >= cased * 6
}

/// Code fences, stack-trace lines, or several lines of programming syntax.
pub fn looks_like_code(text: &str) -> bool {
    const STRONG: &[&str] = &[
        "```",
        "Traceback (most recent call last)",
        "Exception in thread",
        "TypeError:",
        "ReferenceError:",
        "NullPointerException",
        "SyntaxError:",
        "panicked at",
        "curl -",
        "curl http",
        "Stack trace:",
        "stacktrace",
    ];
    if STRONG.iter().any(|s| text.contains(s)) {
        return true;
    }
    let mut code_lines = 0;
    for line in text.lines() {
        let t = line.trim();
        let codey = t.starts_with("at ") && t.contains('(') && t.ends_with(')')
            || t.starts_with("File \"") && t.contains(", line ")
            || t.ends_with(';') && (t.contains('(') || t.contains('='))
            || t.starts_with("def ") && t.ends_with(':')
            || t.starts_with("import ") && t.split_whitespace().count() <= 4
            || (t.starts_with("const ") || t.starts_with("let ")) && t.contains('=')
            || t.starts_with('{') && t.contains("\":")
            || t.starts_with("function ")
            || t.contains("=> {")
            || t.starts_with("POST /")
            || t.starts_with("GET /");
        if codey {
            code_lines += 1;
        }
    }
    code_lines >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_code_and_traces() {
        assert!(looks_like_code("help\n```js\nfetch(x)\n```"));
        assert!(looks_like_code("Traceback (most recent call last):\n  File \"a.py\", line 3"));
        assert!(looks_like_code(
            "Exception in thread \"main\" java.lang.IllegalStateException\n\tat com.x.Y.z(Y.java:10)"
        ));
        assert!(looks_like_code("const sig = hmac(body);\nlet ok = sig === header;"));
        assert!(!looks_like_code("Where is my order? I ordered a lamp; it has not arrived."));
        assert!(!looks_like_code("我的订单什么时候到？"));
    }

    #[test]
    fn shouting_needs_enough_letters() {
        assert!(is_shouting("WHERE IS MY ORDER?? THIS IS RIDICULOUS"));
        assert!(!is_shouting("OK"));
        assert!(!is_shouting("Where is my order?"));
    }
}
