//! Defensive parsing of a triage model's answer: code fences, single quotes,
//! prose around the object, wrong-case enum values and missing fields are all
//! tolerated; anything unusable falls back to the local heuristics field by field.

use serde_json::{Map, Value};

use super::{Signals, Source, Triage};
use crate::vocab::{COMPLEXITIES, RISKS, SENTIMENTS};

/// Parses `answer`. Returns `None` when no usable category can be read, in which
/// case the caller uses the heuristic triage as a whole.
pub fn parse_triage(answer: &str, categories: &[String], fallback: &Triage, signals: &Signals) -> Option<Triage> {
    let object = extract_object(answer)?;
    let field = |key: &str| -> Option<String> {
        object.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).and_then(|(_, v)| match v {
            Value::String(s) => Some(s.trim().to_lowercase().replace([' ', '-'], "_")),
            _ => None,
        })
    };
    let pick = |key: &str, allowed: &[&str], default: &str| -> String {
        field(key).filter(|v| allowed.contains(&v.as_str())).unwrap_or_else(|| default.to_owned())
    };
    let category = field("category").filter(|c| categories.iter().any(|k| k == c))?;
    let language = field("language")
        .map(|l| l.split('_').next().unwrap_or("").to_owned())
        .filter(|l| (2..=3).contains(&l.len()) && l.chars().all(|c| c.is_ascii_lowercase()))
        .unwrap_or_else(|| fallback.language.clone());
    let confidence = object
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("confidence"))
        .and_then(|(_, v)| v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())))
        .filter(|c: &f64| c.is_finite())
        .map(|c| c.clamp(0.0, 1.0))
        .unwrap_or(0.5);
    let risk = pick("risk", RISKS, "none");
    Some(Triage {
        category,
        complexity: pick("complexity", COMPLEXITIES, &fallback.complexity),
        sentiment: pick("sentiment", SENTIMENTS, &fallback.sentiment),
        language,
        risk: super::merge_risk(&risk, signals),
        confidence,
        source: Source::Llm,
    })
}

/// Finds the first JSON object in `answer`, trying strict JSON first and then a
/// single-quote repair.
pub(crate) fn extract_object(answer: &str) -> Option<Map<String, Value>> {
    let start = answer.find('{')?;
    let end = answer.rfind('}')?;
    if end <= start {
        return None;
    }
    let candidate = &answer[start..=end];
    if let Ok(Value::Object(m)) = serde_json::from_str(candidate) {
        return Some(m);
    }
    // Prose after the object that itself contains braces: take the first balanced object.
    if let Some(first) = first_balanced(candidate) {
        if let Ok(Value::Object(m)) = serde_json::from_str(first) {
            return Some(m);
        }
    }
    let repaired = repair_quotes(first_balanced(candidate).unwrap_or(candidate));
    match serde_json::from_str(&repaired) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// The prefix of `s` (starting at `{`) up to its matching `}`, honouring quotes.
fn first_balanced(s: &str) -> Option<&str> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '{' => depth += 1,
            '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(&s[..=i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Turns single-quoted strings into double-quoted ones (Python-dict style answers).
fn repair_quotes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_single = false;
    let mut in_double = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            out.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                out.push(c);
            }
            '\'' if !in_double => {
                in_single = !in_single;
                out.push('"');
            }
            '"' if in_single => out.push_str("\\\""),
            '"' => {
                in_double = !in_double;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn cats() -> Vec<String> {
        ["order_status", "refund_dispute", "other"].iter().map(|s| s.to_string()).collect()
    }

    pub(super) fn fallback() -> Triage {
        Triage {
            category: "other".into(),
            complexity: "simple".into(),
            sentiment: "neutral".into(),
            language: "en".into(),
            risk: "none".into(),
            confidence: 0.2,
            source: Source::Heuristic,
        }
    }

    fn parse(answer: &str) -> Option<Triage> {
        parse_triage(answer, &cats(), &fallback(), &Signals::default())
    }

    #[test]
    fn strict_json() {
        let t = parse(r#"{"category":"order_status","complexity":"simple","sentiment":"angry","language":"zh","risk":"none","confidence":0.9}"#).unwrap();
        assert_eq!((t.category.as_str(), t.sentiment.as_str(), t.language.as_str()), ("order_status", "angry", "zh"));
        assert_eq!(t.source, Source::Llm);
    }

    #[test]
    fn fences_prose_quotes_and_case() {
        let t = parse("Sure! Here you go:\n```json\n{'category': 'Refund Dispute', \"sentiment\": 'NEGATIVE'}\n```\nLet me know {if} you need more.").unwrap();
        assert_eq!(t.category, "refund_dispute");
        assert_eq!(t.sentiment, "negative");
        assert_eq!(t.complexity, "simple", "missing field comes from the fallback");
    }

    #[test]
    fn unusable_answers_give_none() {
        for garbage in ["", "I cannot help with that.", "{}", r#"{"category":"lasers"}"#, "{{{", "}{"] {
            assert!(parse(garbage).is_none(), "{garbage}");
        }
    }

    #[test]
    fn local_legal_flag_overrides_a_model_none() {
        let mut signals = Signals::default();
        signals.flags.insert("legal".into());
        let t = parse_triage(r#"{"category":"other","risk":"none"}"#, &cats(), &fallback(), &signals).unwrap();
        assert_eq!(t.risk, "legal");
    }
}

#[cfg(test)]
mod properties {
    use super::tests::{cats, fallback};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn never_panics_on_any_text(answer in any::<String>()) {
            let _ = parse_triage(&answer, &cats(), &fallback(), &Signals::default());
        }

        #[test]
        fn never_panics_on_json_like_text(answer in r#"[\{\}\[\]"':, a-z_0-9\\\n`]{0,200}"#) {
            let _ = parse_triage(&answer, &cats(), &fallback(), &Signals::default());
        }

        #[test]
        fn valid_answers_survive_any_wrapping(
            prefix in "[^{}]{0,40}",
            suffix in "[^{}]{0,40}",
            category in prop::sample::select(vec!["order_status", "Refund Dispute", "OTHER"]),
            single_quotes in any::<bool>(),
        ) {
            let object = format!(r#"{{"category": "{category}", "sentiment": "angry", "confidence": 0.7}}"#);
            let object = if single_quotes { object.replace('"', "'") } else { object };
            let t = parse_triage(&format!("{prefix}{object}{suffix}"), &cats(), &fallback(), &Signals::default());
            let t = t.expect("a valid object inside prose parses");
            prop_assert_eq!(t.sentiment.as_str(), "angry");
            prop_assert!(cats().contains(&t.category));
        }
    }
}
