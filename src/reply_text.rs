//! Clean-up of a model's reply before it reaches a customer: HTML-escaped quotes
//! decoded, curly quotes made straight (helpdesk widgets and SMS gateways mangle them;
//! Chinese and Japanese keep their own quotation marks), and a reply wrapped whole in
//! quotes — a common model habit — unwrapped.

/// Normalises quote characters of `reply`, written in `language` (ISO 639-1).
pub fn normalize(reply: &str, language: &str) -> String {
    let mut text = reply.trim().to_owned();
    for (entity, plain) in [("&quot;", "\""), ("&#34;", "\""), ("&#39;", "'"), ("&apos;", "'"), ("&#x27;", "'")] {
        if text.contains(entity) {
            text = text.replace(entity, plain);
        }
    }
    if !matches!(language, "zh" | "ja") {
        text = text
            .chars()
            .map(|c| match c {
                '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' | '\u{2033}' => '"',
                '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' | '\u{2032}' => '\'',
                other => other,
            })
            .collect();
    }
    let wrapped = text.len() >= 2
        && ((text.starts_with('"') && text.ends_with('"')) || (text.starts_with('\'') && text.ends_with('\'')))
        && !text[1..text.len() - 1].contains(&text[..1]);
    if wrapped {
        text = text[1..text.len() - 1].trim().to_owned();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn straightens_quotes_outside_cjk() {
        assert_eq!(
            normalize("We\u{2019}re sorry \u{201C}Express\u{201D} was late.", "en"),
            "We're sorry \"Express\" was late."
        );
        assert_eq!(normalize("您的订单“已发货”。", "zh"), "您的订单“已发货”。");
        assert_eq!(normalize("It&#39;s on its way &quot;today&quot;", "en"), "It's on its way \"today\"");
    }

    #[test]
    fn unwraps_a_reply_quoted_whole() {
        assert_eq!(normalize("  \"Your order ships today.\"  ", "en"), "Your order ships today.");
        assert_eq!(normalize("\"A\" and \"B\"", "en"), "\"A\" and \"B\"", "inner quotes are kept");
    }
}
