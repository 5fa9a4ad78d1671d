//! The built-in offline provider. It behaves like its namesake closely enough to
//! drive the embedded default, benchmarks and tests: a latency distribution, token
//! usage, a content filter on a configurable word list (refusing DashScope-style or
//! OpenAI-style), an injectable transient error rate, triage answers from the local
//! keyword classifier and canned per-category replies.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;

use super::{ChatRequest, Outcome, Provider, Usage};
use crate::settings::{ProviderSettings, RefusalStyle};
use crate::ticket::{Message, Stage, Ticket};
use crate::triage::keywords::KeywordSet;
use crate::triage::{prompt, Analyzer};

/// A simulated provider.
pub struct Simulated {
    name: String,
    latency_ms: u64,
    jitter_ms: u64,
    error_rate: f64,
    filter: KeywordSet,
    /// The filter's verdict on each system prompt seen, by the prompt's hash: a
    /// system prompt (instructions and policy text) recurs across tickets, so it is
    /// lower-cased and scanned once, not on every call.
    system_verdicts: std::sync::Mutex<std::collections::HashMap<u64, Option<String>>>,
    refusal_style: RefusalStyle,
    analyzer: Arc<Analyzer>,
}

impl Simulated {
    pub fn new(name: &str, s: &ProviderSettings, analyzer: Arc<Analyzer>) -> Self {
        Simulated {
            name: name.to_owned(),
            latency_ms: s.latency_ms,
            jitter_ms: s.jitter_ms,
            error_rate: s.error_rate,
            filter: KeywordSet::new([("filter", s.filter_words.iter())]),
            system_verdicts: Default::default(),
            refusal_style: s.refusal_style,
            analyzer,
        }
    }

    /// The first filter word in the request. A real filter reads the whole request:
    /// the ticket, and our instructions and policy text too.
    fn filtered(&self, request: &ChatRequest) -> Option<String> {
        if self.filter.is_empty() {
            return None;
        }
        if let Some(word) = self.filter.first_match(&request.user.to_lowercase()) {
            return Some(word.to_owned());
        }
        let key = {
            use std::hash::{BuildHasher, BuildHasherDefault};
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(&request.system)
        };
        let mut verdicts = self.system_verdicts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(verdict) = verdicts.get(&key) {
            return verdict.clone();
        }
        let verdict = self.filter.first_match(&request.system.to_lowercase()).map(str::to_owned);
        if verdicts.len() >= 4096 {
            verdicts.clear(); // prompts are few; this only bounds an unusual configuration
        }
        verdicts.insert(key, verdict.clone());
        verdict
    }

    fn latency(&self) -> Option<Duration> {
        if self.latency_ms == 0 && self.jitter_ms == 0 {
            return None;
        }
        let low = self.latency_ms.saturating_sub(self.jitter_ms);
        let high = self.latency_ms + self.jitter_ms;
        let ms = if high > low { rand::thread_rng().gen_range(low..=high) } else { low };
        Some(Duration::from_millis(ms))
    }

    fn transcript_ticket(request: &ChatRequest) -> Option<Ticket> {
        let t = prompt::parse_ticket_data(&request.user)?;
        let messages: Vec<Message> =
            t.messages.into_iter().map(|m| Message { role: m.role, text: m.text, sent_at: None }).collect();
        Some(Ticket {
            ticket_id: String::new(),
            unit_id: String::new(),
            conversation_id: String::new(),
            customer_id: None,
            customer_tier: None,
            locale: t.locale,
            channel: None,
            subject: t.subject,
            messages,
            metadata: None,
            created_at: None,
        })
    }

    fn triage_answer(&self, ticket: &Ticket) -> String {
        let (_, t) = self.analyzer.analyze(ticket);
        serde_json::json!({
            "category": t.category,
            "complexity": t.complexity,
            "sentiment": t.sentiment,
            "language": t.language,
            "risk": t.risk,
            "confidence": 0.85,
        })
        .to_string()
    }

    /// Flags what the local triage counts as a safety risk (threats, self-harm).
    fn moderation_answer(&self, ticket: &Ticket) -> String {
        let flagged = self.analyzer.signals(ticket).flags.contains(crate::triage::FLAG_SAFETY);
        let reason = if flagged { "possible threat or self-harm" } else { "ordinary customer-support content" };
        serde_json::json!({"flagged": flagged, "reason": reason}).to_string()
    }

    /// A reply follows the system prompt as a model would: its topic and language
    /// are read from the instructions, not guessed again.
    fn reply_answer(&self, request: &ChatRequest) -> String {
        let category = prompt_value(&request.system, "Topic: ", '.').unwrap_or("other");
        let language = prompt_value(&request.system, "(ISO 639-1: ", ')').unwrap_or("en");
        let mut out = String::new();
        out.push_str(greeting(language));
        if request.system.contains("empathy") {
            out.push_str(
                "I'm truly sorry for the trouble this has caused you, and I understand how frustrating it is. ",
            );
        }
        out.push_str(canned_reply(category));
        out
    }
}

#[async_trait]
impl Provider for Simulated {
    async fn complete(&self, request: &ChatRequest) -> Outcome {
        if let Some(delay) = self.latency() {
            tokio::time::sleep(delay).await;
        }
        if self.error_rate > 0.0 && rand::thread_rng().gen_bool(self.error_rate) {
            return Outcome::Transient {
                detail: format!("{}: simulated 503 Service Unavailable", self.name),
                timeout: false,
                reached: true,
            };
        }
        if let Some(word) = self.filtered(request) {
            let detail = format!("{}: content filter (data_inspection_failed) on `{word}`", self.name);
            return match self.refusal_style {
                RefusalStyle::Dashscope => Outcome::Refused { usage: None, detail },
                RefusalStyle::FinishReason => Outcome::Refused { usage: Some(Usage::estimate(request, "")), detail },
            };
        }
        let text = match request.stage {
            Stage::Reply => self.reply_answer(request),
            Stage::Triage | Stage::Moderation => {
                let Some(ticket) = Self::transcript_ticket(request) else {
                    return Outcome::Permanent { detail: format!("{}: 400 request has no ticket data", self.name) };
                };
                if request.stage == Stage::Triage {
                    self.triage_answer(&ticket)
                } else {
                    self.moderation_answer(&ticket)
                }
            }
        };
        let usage = Usage::estimate(request, &text);
        Outcome::Ok { text, usage: Some(usage) }
    }
}

/// The text between `key` and `end` in a prompt.
fn prompt_value<'a>(prompt: &'a str, key: &str, end: char) -> Option<&'a str> {
    let start = prompt.find(key)? + key.len();
    let rest = &prompt[start..];
    Some(&rest[..rest.find(end)?])
}

fn greeting(language: &str) -> &'static str {
    match language {
        "zh" => "您好，感谢您联系我们。",
        "es" => "Hola, gracias por escribirnos. ",
        "th" => "สวัสดีค่ะ ขอบคุณที่ติดต่อเรา ",
        "vi" => "Xin chào, cảm ơn bạn đã liên hệ với chúng tôi. ",
        _ => "Hello, and thank you for contacting us. ",
    }
}

fn canned_reply(category: &str) -> &'static str {
    match category {
        "order_status" => "Your order is on its way. You can follow it with the tracking link in your confirmation email; most orders arrive within 3-5 business days of dispatch.",
        "return_policy" => "You can return unused items within 30 days of delivery. Start the return from your order page and we will email you a prepaid label.",
        "shipping" => "Standard shipping takes 3-5 business days and is free on orders over $50. Express shipping is available at checkout.",
        "account" => "You can reset your password from the sign-in page with 'Forgot password'. For security we never change account details over chat.",
        "billing" => "I have checked your billing question. Any duplicate authorisation is released by your bank within 5-7 business days; your invoice is in your account under Orders.",
        "refund_dispute" => "I have reviewed your refund request against our refund policy and escalated it to our refunds team, who will reply within 2 business days.",
        "technical" => "Please try a full restart: hold the power button for 10 seconds, then update to the latest firmware from the app. If the problem persists, reply with the model and serial number.",
        "product_question" => "The full specifications, dimensions and compatibility list are on the product page under 'Details'.",
        "complaint" => "Thank you for telling us. I have shared your feedback with the team responsible so we can put this right.",
        _ => "A member of our team has your message and will follow up shortly.",
    }
}
