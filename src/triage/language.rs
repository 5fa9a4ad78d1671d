//! Language of a customer message: whatlang's detector, with two corrections that
//! matter for routing: mixed Chinese-English text counts as Chinese when a fair share
//! of it is Han characters, and an unreliable guess on short text defers to the
//! ticket's `locale`.

use whatlang::Lang;

/// Bytes of a message the detector looks at. Trigram detection cost grows with the
/// text while its answer settles within a few sentences; this cap made language
/// detection go from most of a ticket's CPU time to a small share of it.
const SAMPLE_BYTES: usize = 400;

/// ISO 639-1 code of `text`, or of `locale` when the text is too short to tell.
pub fn detect(text: &str, locale: Option<&str>) -> String {
    let text = sample(text);
    let from_locale = locale.and_then(|l| l.split(['-', '_']).next()).filter(|l| !l.is_empty()).map(str::to_lowercase);
    // A Han character carries about as much as a Latin word, so compare those.
    let han = text.chars().filter(|&c| matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF)).count();
    let latin_words = text.split(|c: char| !c.is_ascii_alphabetic()).filter(|w| !w.is_empty()).count();
    if han > 0 && han >= latin_words {
        // Japanese text also uses Han; kana decides.
        let kana = text.chars().any(|c| matches!(c as u32, 0x3040..=0x30FF));
        return if kana { "ja".into() } else { "zh".into() };
    }
    match detector().detect(text) {
        Some(info) if info.is_reliable() || from_locale.is_none() => iso639_1(info.lang()).into(),
        _ => from_locale.unwrap_or_else(|| "und".into()),
    }
}

/// Languages the detector chooses among, with the ISO 639-1 code reported for each.
/// Restricting the candidates keeps detection cheap (whatlang scores every allowed
/// language's trigrams) and stops short support texts from being read as a rare
/// language that shares their spelling (a short English line came back as Afrikaans
/// before this list).
const LANGUAGES: &[(Lang, &str)] = &[
    (Lang::Eng, "en"),
    (Lang::Cmn, "zh"),
    (Lang::Spa, "es"),
    (Lang::Tha, "th"),
    (Lang::Vie, "vi"),
    (Lang::Jpn, "ja"),
    (Lang::Kor, "ko"),
    (Lang::Fra, "fr"),
    (Lang::Deu, "de"),
    (Lang::Por, "pt"),
    (Lang::Ita, "it"),
    (Lang::Nld, "nl"),
    (Lang::Rus, "ru"),
    (Lang::Ind, "id"),
    (Lang::Tur, "tr"),
    (Lang::Pol, "pl"),
    (Lang::Ara, "ar"),
    (Lang::Hin, "hi"),
    (Lang::Ukr, "uk"),
    (Lang::Swe, "sv"),
    (Lang::Heb, "he"),
    (Lang::Ell, "el"),
    (Lang::Tgl, "tl"),
];

fn detector() -> &'static whatlang::Detector {
    static DETECTOR: std::sync::OnceLock<whatlang::Detector> = std::sync::OnceLock::new();
    DETECTOR.get_or_init(|| whatlang::Detector::with_allowlist(LANGUAGES.iter().map(|(lang, _)| *lang).collect()))
}

/// The first [`SAMPLE_BYTES`] of `text`, cut at a character boundary.
fn sample(text: &str) -> &str {
    if text.len() <= SAMPLE_BYTES {
        return text;
    }
    let mut end = SAMPLE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn iso639_1(lang: Lang) -> &'static str {
    LANGUAGES.iter().find(|(l, _)| *l == lang).map_or(lang.code(), |(_, code)| code)
}

#[cfg(test)]
mod tests {
    use super::detect;

    #[test]
    fn detects_the_supported_languages() {
        assert_eq!(detect("Where is my order? It was supposed to arrive on Monday.", None), "en");
        assert_eq!(detect("我的订单什么时候到？已经等了一个星期了。", None), "zh");
        assert_eq!(detect("¿Dónde está mi pedido? Lo compré hace dos semanas y no ha llegado.", None), "es");
        assert_eq!(detect("สินค้าของฉันยังไม่มาถึงเลย สั่งไปตั้งแต่สัปดาห์ที่แล้ว", None), "th");
        assert_eq!(detect("Đơn hàng của tôi vẫn chưa được giao, tôi đã đặt từ tuần trước.", None), "vi");
    }

    #[test]
    fn mixed_chinese_english_is_chinese() {
        assert_eq!(detect("我的 order #8812 还没 ship，tracking number 显示 pending", None), "zh");
    }

    #[test]
    fn short_text_defers_to_locale() {
        assert_eq!(detect("ok", Some("es-MX")), "es");
    }
}
