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

/// Tells the language of customer messages. Scripts of their own decide at once;
/// Latin-script prose is told apart among the configured `triage.latin_languages`
/// only (Vietnamese by its own letters when listed, the rest by trigrams).
#[derive(Debug, Clone)]
pub struct Detector {
    /// whatlang restricted to the configured Latin-script languages other than
    /// Vietnamese; `None` when there are none.
    trigrams: Option<whatlang::Detector>,
    vietnamese: bool,
    /// The one configured Latin-script language besides Vietnamese, if there is
    /// just one: it needs no trigrams.
    only: Option<&'static str>,
}

impl Detector {
    /// A detector for the given Latin-script languages (ISO 639-1 codes), or the
    /// codes it does not know.
    pub fn new(latin_languages: &[String]) -> Result<Detector, Vec<String>> {
        let unknown: Vec<String> =
            latin_languages.iter().filter(|c| !LATIN.iter().any(|(_, known)| known == c)).cloned().collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let others: Vec<(Lang, &'static str)> = LATIN
            .iter()
            .filter(|(lang, code)| *lang != Lang::Vie && latin_languages.iter().any(|c| c == code))
            .copied()
            .collect();
        Ok(Detector {
            vietnamese: latin_languages.iter().any(|c| c == "vi"),
            only: match others.as_slice() {
                [(_, code)] => Some(code),
                _ => None,
            },
            trigrams: (others.len() > 1)
                .then(|| whatlang::Detector::with_allowlist(others.iter().map(|(lang, _)| *lang).collect())),
        })
    }

    /// ISO 639-1 code of `text`, or of `locale` when the text is too short to tell.
    pub fn detect(&self, text: &str, locale: Option<&str>) -> String {
        let prose = prose(text);
        let text = sample(if prose.trim().is_empty() { text } else { &prose });
        let from_locale =
            locale.and_then(|l| l.split(['-', '_']).next()).filter(|l| !l.is_empty()).map(str::to_lowercase);
        let scripts = Scripts::count(text);
        if let Some(lang) = scripts.decide() {
            return lang.into();
        }
        if scripts.latin_letters == 0 {
            return from_locale.unwrap_or_else(|| "und".into());
        }
        if self.vietnamese && scripts.is_vietnamese() {
            return "vi".into();
        }
        let Some(trigrams) = &self.trigrams else {
            return self.only.map(str::to_owned).or(from_locale).unwrap_or_else(|| "und".into());
        };
        match trigrams.detect(text) {
            Some(info) if info.is_reliable() || from_locale.is_none() => iso639_1(info.lang()).into(),
            _ => from_locale.unwrap_or_else(|| "und".into()),
        }
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
    /// Latin letters only Vietnamese uses (ơ ư ă đ and the stacked tone marks).
    vietnamese: usize,
}

impl Scripts {
    fn count(text: &str) -> Scripts {
        let mut s = Scripts::default();
        let mut in_word = false;
        for c in text.chars() {
            let latin = c.is_alphabetic() && (c.is_ascii() || matches!(c as u32, 0xC0..=0x24F | 0x1E00..=0x1EFF));
            if latin {
                s.latin_letters += 1;
                if matches!(c as u32, 0x1EA0..=0x1EF9 | 0x102 | 0x103 | 0x110 | 0x111 | 0x1A0 | 0x1A1 | 0x1AF | 0x1B0) {
                    s.vietnamese += 1;
                }
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

    /// Whether the Latin letters are Vietnamese: its own letters (ơ ư ă đ ạ ế ...)
    /// make up a good share of them, where other languages have none at all.
    fn is_vietnamese(&self) -> bool {
        self.vietnamese >= 2 && self.vietnamese * 20 >= self.latin_letters
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

/// The Latin-script languages `triage.latin_languages` may list (every other script
/// is decided by [`Scripts::decide`]), with the ISO 639-1 code reported for each.
/// The detector chooses among the configured ones only: whatlang scores every
/// allowed language's trigrams, so each one costs time, and short support texts are
/// not read as a rare language that shares their spelling (a short English line
/// came back as Afrikaans before the list).
pub const LATIN: &[(Lang, &str)] = &[
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
    LATIN.iter().find(|(l, _)| *l == lang).map_or(lang.code(), |(_, code)| code)
}

#[cfg(test)]
mod tests {
    use super::Detector;

    /// The shipped `triage.latin_languages`.
    fn detect(text: &str, locale: Option<&str>) -> String {
        let shipped = crate::policy::load_from(None, &Default::default()).unwrap().triage.latin_languages;
        Detector::new(&shipped).unwrap().detect(text, locale)
    }

    fn detector(codes: &[&str]) -> Detector {
        Detector::new(&codes.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn latin_text_is_told_apart_among_the_configured_languages_only() {
        let german = "Meine Bestellung ist immer noch nicht angekommen, bitte helfen Sie mir.";
        assert_eq!(detector(&["en", "de", "es"]).detect(german, None), "de");
        assert_ne!(detector(&["en", "es"]).detect(german, None), "de");
        // Vietnamese is read from its own letters, with or without other languages.
        let vietnamese = "Đơn hàng của tôi vẫn chưa được giao, tôi đã đặt từ tuần trước.";
        assert_eq!(detector(&["vi"]).detect(vietnamese, None), "vi");
        assert_eq!(detector(&["en", "vi"]).detect(vietnamese, None), "vi");
        // One Latin-script language needs no detection; scripts decide whatever is listed.
        assert_eq!(detector(&["es", "vi"]).detect("Where is my order?", None), "es");
        assert_eq!(detector(&["en"]).detect("我的订单什么时候到？", None), "zh");
        // Spanish and French accents are not Vietnamese.
        let spanish = "¿Dónde está mi pedido? Lo compré hace dos semanas y aún no ha llegado. Además, ¿pueden cambiar la dirección?";
        let french = "Bonjour, ma commande n'est toujours pas arrivée. Pourriez-vous vérifier où elle se trouve? Merci beaucoup, à bientôt.";
        let all = detector(&["en", "es", "fr", "vi"]);
        assert_eq!(all.detect(spanish, None), "es");
        assert_eq!(all.detect(french, None), "fr");
    }

    #[test]
    fn an_unknown_code_is_named() {
        let err = Detector::new(&["en".to_owned(), "xx".to_owned(), "zh".to_owned()]).unwrap_err();
        assert_eq!(err, ["xx", "zh"]);
    }

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
