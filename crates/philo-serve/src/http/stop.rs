//! `stop` strings: ending a completion where its text first contains one of them.
//!
//! Tokens and stop strings need not line up (a stop string may end inside a token or span
//! several), so matching happens on the decoded text. Text that might be the start of a stop
//! string is held back until the following text shows whether it is one, so nothing from a stop
//! string on ever reaches the client, streaming or not.

/// What [`StopStrings::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// No stop string yet; the text is safe to send (possibly empty while text is held back).
    Continue(String),
    /// A stop string was found; the text is what comes before it and not sent yet.
    Stopped(String),
}

/// Watches generated text for stop strings.
#[derive(Debug, Clone)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet released: a suffix that is a prefix of some stop string.
    held: String,
}

impl StopStrings {
    /// Watches for `stops`; none of them may be empty (the routes reject empty ones).
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops,
            held: String::new(),
        }
    }

    /// Adds the next piece of generated text.
    pub fn push(&mut self, text: &str) -> Scan {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            self.held.truncate(at);
            return Scan::Stopped(std::mem::take(&mut self.held));
        }
        let keep_from = self.possible_start();
        let rest = self.held.split_off(keep_from);
        Scan::Continue(std::mem::replace(&mut self.held, rest))
    }

    /// Ends the text: what was held back is not the start of a stop string after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The byte offset of the earliest suffix of the held text that some stop string starts
    /// with (the held text's length when there is none).
    fn possible_start(&self) -> usize {
        self.held
            .char_indices()
            .map(|(at, _)| at)
            .find(|&at| {
                let tail = &self.held[at..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> StopStrings {
        StopStrings::new(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn text_without_stop_strings_passes_through() {
        let mut s = stops(&[]);
        assert_eq!(s.push("Hello"), Scan::Continue("Hello".into()));
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn stop_string_inside_one_piece_truncates_before_it() {
        let mut s = stops(&["END"]);
        assert_eq!(s.push("abc END def"), Scan::Stopped("abc ".into()));
    }

    #[test]
    fn stop_string_across_pieces_is_held_back_then_dropped() {
        let mut s = stops(&["\n\nUser:"]);
        assert_eq!(s.push("Sure.\n"), Scan::Continue("Sure.".into()));
        assert_eq!(s.push("\nUs"), Scan::Continue(String::new()));
        assert_eq!(s.push("er: hi"), Scan::Stopped(String::new()));
    }

    #[test]
    fn held_text_is_released_when_it_turns_out_not_to_be_a_stop_string() {
        let mut s = stops(&["ab"]);
        assert_eq!(s.push("xa"), Scan::Continue("x".into()));
        assert_eq!(s.push("c"), Scan::Continue("ac".into()));
        assert_eq!(s.push("a"), Scan::Continue(String::new()));
        assert_eq!(s.finish(), "a");
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let mut s = stops(&["world", "lo"]);
        assert_eq!(s.push("hello world"), Scan::Stopped("hel".into()));
    }

    #[test]
    fn multibyte_text_is_split_on_char_boundaries() {
        let mut s = stops(&["é!"]);
        assert_eq!(s.push("café"), Scan::Continue("caf".into()));
        assert_eq!(s.push("?"), Scan::Continue("é?".into()));
    }
}
