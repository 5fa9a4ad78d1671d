//! Language of a customer message: whatlang's detector, with two corrections that
//! matter for routing: mixed Chinese-English text counts as Chinese when a fair share
//! of it is Han characters, and an unreliable guess on short text defers to the
//! ticket's `locale`.

use whatlang::Lang;

/// ISO 639-1 code of `text`, or of `locale` when the text is too short to tell.
pub fn detect(text: &str, locale: Option<&str>) -> String {
    let from_locale = locale
        .and_then(|l| l.split(['-', '_']).next())
        .filter(|l| !l.is_empty())
        .map(str::to_lowercase);
    let (han, letters) = text.chars().fold((0usize, 0usize), |(h, l), c| {
        let is_han = matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF);
        (h + usize::from(is_han), l + usize::from(c.is_alphabetic()))
    });
    if han > 0 && han * 5 >= letters {
        // Japanese text also uses Han; kana decides.
        let kana = text.chars().any(|c| matches!(c as u32, 0x3040..=0x30FF));
        return if kana { "ja".into() } else { "zh".into() };
    }
    match whatlang::detect(text) {
        Some(info) if info.is_reliable() || from_locale.is_none() => iso639_1(info.lang()).into(),
        _ => from_locale.unwrap_or_else(|| "und".into()),
    }
}

fn iso639_1(lang: Lang) -> &'static str {
    match lang {
        Lang::Eng => "en",
        Lang::Cmn => "zh",
        Lang::Spa => "es",
        Lang::Tha => "th",
        Lang::Vie => "vi",
        Lang::Jpn => "ja",
        Lang::Kor => "ko",
        Lang::Fra => "fr",
        Lang::Deu => "de",
        Lang::Por => "pt",
        Lang::Ita => "it",
        Lang::Nld => "nl",
        Lang::Rus => "ru",
        Lang::Ind => "id",
        Lang::Tur => "tr",
        Lang::Pol => "pl",
        Lang::Ara => "ar",
        Lang::Hin => "hi",
        Lang::Ukr => "uk",
        Lang::Swe => "sv",
        Lang::Dan => "da",
        Lang::Fin => "fi",
        Lang::Ces => "cs",
        Lang::Ron => "ro",
        Lang::Hun => "hu",
        Lang::Heb => "he",
        Lang::Ell => "el",
        Lang::Tgl => "tl",
        other => other.code(),
    }
}

#[cfg(test)]
mod tests {
    use super::detect;

    #[test]
    fn detects_the_supported_languages() {
        assert_eq!(
            detect(
                "Where is my order? It was supposed to arrive on Monday.",
                None
            ),
            "en"
        );
        assert_eq!(
            detect("我的订单什么时候到？已经等了一个星期了。", None),
            "zh"
        );
        assert_eq!(
            detect(
                "¿Dónde está mi pedido? Lo compré hace dos semanas y no ha llegado.",
                None
            ),
            "es"
        );
        assert_eq!(detect("สินค้าของฉันยังไม่มาถึงเลย สั่งไปตั้งแต่สัปดาห์ที่แล้ว", None), "th");
        assert_eq!(
            detect(
                "Đơn hàng của tôi vẫn chưa được giao, tôi đã đặt từ tuần trước.",
                None
            ),
            "vi"
        );
    }

    #[test]
    fn mixed_chinese_english_is_chinese() {
        assert_eq!(
            detect(
                "我的 order #8812 还没 ship，tracking number 显示 pending",
                None
            ),
            "zh"
        );
    }

    #[test]
    fn short_text_defers_to_locale() {
        assert_eq!(detect("ok", Some("es-MX")), "es");
    }
}
