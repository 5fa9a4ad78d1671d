//! The wire contract (SPEC §3): tickets in, replies, cost records and dead letters out.
//!
//! Field names here are the external contract; renaming one is a breaking change for
//! every helpdesk and dashboard that reads our topics.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Version stamped on every output message.
pub const SCHEMA_VERSION: u32 = 1;

/// Who wrote a message in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Agent,
    System,
}

/// One message of the conversation, as the helpdesk sent it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
}

/// A validated input ticket (SPEC §3.1). Built only by [`crate::intake`].
#[derive(Debug, Clone)]
pub struct Ticket {
    pub ticket_id: String,
    /// `ticket_id` plus a fingerprint of `messages`: the idempotency key.
    pub unit_id: String,
    pub conversation_id: String,
    pub customer_id: Option<String>,
    pub customer_tier: Option<String>,
    pub locale: Option<String>,
    pub channel: Option<String>,
    pub subject: Option<String>,
    pub messages: Vec<Message>,
    /// Echoed back as the exact JSON text received.
    pub metadata: Option<Box<RawValue>>,
    pub created_at: Option<String>,
}

impl Ticket {
    /// The most recent customer message, which is what the reply must answer.
    pub fn latest_customer_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::Customer)
            .or(self.messages.last())
            .map(|m| m.text.as_str())
            .unwrap_or("")
    }

    /// Number of messages written by the customer.
    pub fn customer_turns(&self) -> usize {
        self.messages.iter().filter(|m| m.role == Role::Customer).count()
    }

    /// Looks up a top-level string (or scalar) value of `metadata`, for routing rules.
    pub fn metadata_value(&self, key: &str) -> Option<String> {
        let raw = self.metadata.as_ref()?;
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw.get()).ok()?;
        match map.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}

/// Triage outcome carried on every reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriageView {
    pub category: String,
    pub complexity: String,
    pub sentiment: String,
    pub language: String,
    pub risk: String,
    /// `llm` or `heuristic`.
    pub source: String,
}

/// Where the reply came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteView {
    /// `cheap`, `premium`, a specialist chain name, or `human`.
    pub tier: String,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub reasons: Vec<String>,
    /// Reply-stage provider calls made for this unit of work.
    pub attempts: u32,
}

/// Present when a provider refused the ticket (content filter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModerationView {
    /// `provider/model` of every refusal, in order.
    pub refused_by: Vec<String>,
    /// `passed` or `flagged`: the result of our own moderation check.
    pub check: String,
    pub bypassed: bool,
}

/// `answered` or `needs_human`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyStatus {
    Answered,
    NeedsHuman,
}

impl ReplyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyStatus::Answered => "answered",
            ReplyStatus::NeedsHuman => "needs_human",
        }
    }
}

/// A reply (SPEC §3.2). Every field is always present, `null` where there is no value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub schema_version: u32,
    pub ticket_id: String,
    pub unit_id: String,
    pub conversation_id: String,
    pub status: ReplyStatus,
    pub reply: Option<String>,
    pub triage: TriageView,
    pub route: RouteView,
    pub moderation: Option<ModerationView>,
    #[serde(serialize_with = "usd")]
    pub cost_usd: f64,
    pub latency_ms: u64,
    pub metadata: Option<Box<RawValue>>,
    pub processed_at: String,
    pub worker_id: String,
}

/// Decimal places of every USD amount ticketflow writes: a ten-billionth of a
/// dollar, finer than one token of the cheapest price (0.02 USD per million tokens is
/// two hundred-millionths), and free of binary noise (`0.0000272`, never
/// `0.000027200000000000004`). Outputs, the `report`, `explain` and `eval` JSON all
/// round with it.
pub const USD_DECIMALS: i32 = 10;

/// `usd` rounded to [`USD_DECIMALS`].
pub fn round_usd(usd: f64) -> f64 {
    let scale = 10f64.powi(USD_DECIMALS);
    (usd * scale).round() / scale
}

/// Serializes a USD amount rounded to [`USD_DECIMALS`] (`#[serde(serialize_with)]`).
pub fn usd<S: serde::Serializer>(usd: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(round_usd(*usd))
}

/// Which pipeline stage made a provider call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Triage,
    Reply,
    Moderation,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Triage => "triage",
            Stage::Reply => "reply",
            Stage::Moderation => "moderation",
        }
    }
}

/// How one provider call ended, as recorded in its cost record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    Ok,
    Refused,
    RateLimited,
    Error,
    Timeout,
    /// Sent, but its answer never came back to us: the worker died or was cut off
    /// while the call was in flight. Recorded before it was sent and priced at that
    /// estimate; the unit's next owner publishes it (SPEC §3.3).
    Lost,
}

/// One record per provider call that reached a provider (SPEC §3.3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostRecord {
    pub schema_version: u32,
    pub ticket_id: String,
    pub unit_id: String,
    pub call_id: String,
    pub stage: Stage,
    pub provider: String,
    pub model: String,
    /// All input tokens, cached ones included.
    pub input_tokens: u64,
    /// The part of `input_tokens` the provider served from its prompt cache (priced at
    /// the cached-input price). Not in SPEC §3.3's example; added so every cost record
    /// can be re-priced from its own fields.
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    #[serde(serialize_with = "usd")]
    pub cost_usd: f64,
    /// `pricing.pricing_version` of the price table that priced this call. Not in
    /// SPEC §3.3's example; added so that costs stay auditable across price changes.
    pub pricing_version: String,
    pub outcome: CallOutcome,
    pub latency_ms: u64,
    pub at: String,
    /// True when the token counts are our estimate because the provider reported no usage.
    pub estimated: bool,
    /// What this call stands for before the migration: for the successful reply call
    /// of a unit ([`CostRecord::is_answer`]), its tokens priced on the baseline
    /// premium model; 0 for every other call (triage, moderation, refusals, failed
    /// attempts), which an all-premium setup would not have made. Priced when the
    /// record is made. Internal: not on the wire (the ledger stores it in a column of
    /// its own), so a record read back from a stored output has 0 here until
    /// [`crate::providers::pricing::PriceTable::fill_baselines`] prices it again.
    #[serde(skip)]
    pub baseline_cost_usd: f64,
}

impl CostRecord {
    /// Whether this is the call that answered its unit: the one call a unit would
    /// have cost on the all-premium baseline.
    pub fn is_answer(&self) -> bool {
        self.stage == Stage::Reply && self.outcome == CallOutcome::Ok
    }
}

/// Why a message became a dead letter (SPEC §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    TooLarge,
    InvalidEncoding,
    InvalidJson,
    InvalidTicket,
    ProvidersExhausted,
    Rejected,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::TooLarge => "too_large",
            ErrorKind::InvalidEncoding => "invalid_encoding",
            ErrorKind::InvalidJson => "invalid_json",
            ErrorKind::InvalidTicket => "invalid_ticket",
            ErrorKind::ProvidersExhausted => "providers_exhausted",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Internal => "internal",
        }
    }
}

/// `error` object of a dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Where the failed message was read from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// How `payload` is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    Utf8,
    Base64,
}

/// A message that could not be answered (SPEC §3.4).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub schema_version: u32,
    pub ticket_id: Option<String>,
    pub unit_id: Option<String>,
    pub error: DeadLetterError,
    pub attempts: u32,
    pub replay_count: u32,
    pub source: SourceRef,
    pub failed_at: String,
    pub worker_id: String,
    pub payload: String,
    pub payload_encoding: PayloadEncoding,
}

impl DeadLetter {
    /// The original bytes, decoded back from `payload`, for replay.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        use base64::Engine as _;
        match self.payload_encoding {
            PayloadEncoding::Utf8 => Ok(self.payload.as_bytes().to_vec()),
            PayloadEncoding::Base64 => base64::engine::general_purpose::STANDARD.decode(&self.payload),
        }
    }
}

/// Encodes raw bytes for a dead letter: UTF-8 text as is, anything else as base64.
pub fn encode_payload(bytes: &[u8]) -> (String, PayloadEncoding) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), PayloadEncoding::Utf8),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(bytes), PayloadEncoding::Base64),
    }
}

/// RFC 3339 timestamp with millisecond precision, UTC, as used in every output.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Everything one unit of work produces: its final message and the cost records of
/// the calls made for it. Published together, recorded in the ledger together.
// One `Output` exists per unit in flight and is moved, not copied in bulk; boxing the
// reply would add an allocation per ticket to save a few hundred bytes.
#[allow(clippy::large_enum_variant)]
// Externally tagged: an internally tagged enum buffers its content while reading it,
// and `metadata`'s RawValue cannot be read back from such a buffer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    Reply { reply: Reply, costs: Vec<CostRecord> },
    DeadLetter { dead_letter: DeadLetter, costs: Vec<CostRecord> },
}

impl Output {
    pub fn costs(&self) -> &[CostRecord] {
        match self {
            Output::Reply { costs, .. } | Output::DeadLetter { costs, .. } => costs,
        }
    }
}
