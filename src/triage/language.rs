//! Language of a customer message, decided by script first: Han (with kana for
//! Japanese), Thai, Hangul, Cyrillic, Arabic, Hebrew, Greek and Devanagari text needs
//! no trigram model, and mixed Chinese-English counts as Chinese when its Han
//! characters are at least as many as its Latin words. Only Latin-script prose goes
//! to whatlang's trigram detector, restricted to the Latin-script languages below.
//! Code, stack traces and commands are set aside first (a Chinese message around a
//! Python traceback is Chinese), and an unreliable guess on short text defers to the
//! ticket's `locale`.

use whatlang::Lang;

/// Bytes of a message the detector looks at. Trigram detection cost grows with the
/// text while its answer settles within a few sentences; this cap made language
/// detection go from most of a ticket's CPU time to a small share of it.
const SAMPLE_BYTES: usize = 400;

/// ISO 639-1 code of `text`, or of `locale` when the text is too short to tell.
pub fn detect(text: &str, locale: Option<&str>) -> String {
    let prose = prose(text);
    let text = sample(if prose.trim().is_empty() { text } else { &prose });
    let from_locale = locale.and_then(|l| l.split(['-', '_']).next()).filter(|l| !l.is_empty()).map(str::to_lowercase);
    let scripts = Scripts::count(text);
    if let Some(lang) = scripts.decide() {
        return lang.into();
    }
    if scripts.latin_letters == 0 {
        return from_locale.unwrap_or_else(|| "und".into());
    }
    match detector().detect(text) {
        Some(info) if info.is_reliable() || from_locale.is_none() => iso639_1(info.lang()).into(),
        _ => from_locale.unwrap_or_else(|| "und".into()),
    }
}

/// Characters of each script in a text.
#[derive(Debug, Default)]
struct Scripts {
    han: usize,
    kana: usize,
    hangul: usize,
    thai: usize,
    cyrillic: usize,
    /// Cyrillic letters only Ukrainian uses (і ї є ґ).
    ukrainian: usize,
    arabic: usize,
    hebrew: usize,
    greek: usize,
    devanagari: usize,
    latin_letters: usize,
    latin_words: usize,
}

impl Scripts {
    fn count(text: &str) -> Scripts {
        let mut s = Scripts::default();
        let mut in_word = false;
        for c in text.chars() {
            let latin = c.is_alphabetic() && (c.is_ascii() || matches!(c as u32, 0xC0..=0x24F | 0x1E00..=0x1EFF));
            if latin {
                s.latin_letters += 1;
                if !in_word {
                    s.latin_words += 1;
                }
            }
            in_word = latin;
            match c as u32 {
                0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF => s.han += 1,
                0x3040..=0x30FF => s.kana += 1,
                0xAC00..=0xD7AF | 0x1100..=0x11FF => s.hangul += 1,
                0x0E00..=0x0E7F => s.thai += 1,
                0x0400..=0x04FF => {
                    s.cyrillic += 1;
                    if matches!(c, 'і' | 'ї' | 'є' | 'ґ' | 'І' | 'Ї' | 'Є' | 'Ґ') {
                        s.ukrainian += 1;
                    }
                }
                0x0600..=0x06FF => s.arabic += 1,
                0x0590..=0x05FF => s.hebrew += 1,
                0x0370..=0x03FF => s.greek += 1,
                0x0900..=0x097F => s.devanagari += 1,
                _ => {}
            }
        }
        s
    }

    /// The language its script alone tells, if any. Han and kana characters carry
    /// about as much as a Latin word; alphabets are compared letter for letter (a
    /// Hangul syllable holds two or three letters).
    fn decide(&self) -> Option<&'static str> {
        if self.kana > 0 && self.han + self.kana >= self.latin_words {
            return Some("ja");
        }
        if self.han > 0 && self.han >= self.latin_words {
            return Some("zh");
        }
        let cyrillic = if self.ukrainian > 0 { "uk" } else { "ru" };
        [
            (self.thai, "th"),
            (self.hangul * 2, "ko"),
            (self.cyrillic, cyrillic),
            (self.arabic, "ar"),
            (self.hebrew, "he"),
            (self.greek, "el"),
            (self.devanagari, "hi"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0 && *n >= self.latin_letters)
        .max_by_key(|(n, _)| *n)
        .map(|(_, lang)| lang)
    }
}

/// The prose of a message: fenced code blocks and lines that look like code, stack
/// traces, commands or log output left out. Only a sample is looked at, so it stops
/// once it has [`SAMPLE_BYTES`] of prose.
fn prose(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(SAMPLE_BYTES + 64));
    let mut fenced = false;
    for line in text.lines() {
        if out.len() >= SAMPLE_BYTES {
            break;
        }
        let t = line.trim();
        if t.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || is_code_line(line) {
            continue;
        }
        out.push_str(t);
        out.push('\n');
    }
    out
}

fn is_code_line(line: &str) -> bool {
    const STARTS: &[&str] = &[
        "Traceback",
        "File \"",
        "at ",
        "$ ",
        ">>> ",
        "#include",
        "import ",
        "from ",
        "def ",
        "class ",
        "const ",
        "let ",
        "var ",
        "function ",
        "curl ",
        "POST /",
        "GET /",
        "PUT /",
        "DELETE /",
        "{",
        "}",
        "[",
        "<",
        "//",
        "#!",
    ];
    const CONTAINS: &[&str] = &["();", "=>", "::", "Error:", "Exception", "\":", " == ", "!=", "()", "->", "\\n"];
    let t = line.trim();
    line.starts_with("  ")
        || line.starts_with('\t')
        || STARTS.iter().any(|s| t.starts_with(s))
        || CONTAINS.iter().any(|s| t.contains(s))
        || t.ends_with(';')
        || t.ends_with('{')
}

/// The Latin-script languages the trigram detector chooses among (every other
/// script is decided by [`Scripts::decide`]), with the ISO 639-1 code reported for
/// each. Restricting the candidates keeps detection cheap (whatlang scores every
/// allowed language's trigrams) and stops short support texts from being read as a
/// rare language that shares their spelling (a short English line came back as
/// Afrikaans before this list).
const LANGUAGES: &[(Lang, &str)] = &[
    (Lang::Eng, "en"),
    (Lang::Spa, "es"),
    (Lang::Vie, "vi"),
    (Lang::Fra, "fr"),
    (Lang::Deu, "de"),
    (Lang::Por, "pt"),
    (Lang::Ita, "it"),
    (Lang::Nld, "nl"),
    (Lang::Ind, "id"),
    (Lang::Tur, "tr"),
    (Lang::Pol, "pl"),
    (Lang::Swe, "sv"),
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
    fn scripts_decide_without_trigrams() {
        assert_eq!(detect("배송이 아직 안 왔어요. 주문 번호 확인 부탁드립니다.", None), "ko");
        assert_eq!(detect("注文した商品がまだ届きません。確認してください。", None), "ja");
        assert_eq!(detect("Мой заказ до сих пор не пришёл.", None), "ru");
        assert_eq!(detect("Моє замовлення досі не прийшло, і я хвилююся.", None), "uk");
        assert_eq!(detect("สั่ง iPhone case ไปแล้วยังไม่ได้รับของเลยค่ะ", None), "th");
    }

    #[test]
    fn code_and_stack_traces_are_set_aside() {
        // The shipped example T-1159: Chinese around a Python traceback.
        let t1159 = "用 storefront-sdk 拉 products 的时候偶尔报错：\n\nTraceback (most recent call last):\n  File \"sync.py\", line 31, in <module>\n    products = client.products.list(limit=250)\n  File \"/opt/venv/lib/python3.10/site-packages/storefront/_client.py\", line 201, in _get\n    raise APIConnectionError(str(e)) from e\nstorefront.errors.APIConnectionError: ('Connection aborted.', RemoteDisconnected('Remote end closed connection without response'))\n\n我们的 server 在阿里云香港，是不是网络问题？SDK 有没有 retry 的 config？";
        assert_eq!(detect(t1159, Some("zh-CN")), "zh");
        let spanish = "Hola, el pago falla con este error:\n```\nTypeError: Cannot read properties of undefined (reading 'id')\n    at checkout.js:12:5\n```\n¿Pueden ayudarme? No sé qué hacer.";
        assert_eq!(detect(spanish, None), "es");
    }

    #[test]
    fn short_text_defers_to_locale() {
        assert_eq!(detect("ok", Some("es-MX")), "es");
    }
}
