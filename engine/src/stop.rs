//! [`StopFilter`]: holds back generated text that could still turn into a stop sequence, so
//! that a stop sequence split across tokens is never streamed. Every engine that reads GGUF
//! models (candle, mlx) stops through this one filter, so they stop identically.

/// Holds back text that could still turn into a stop sequence.
#[derive(Debug, Clone)]
pub(crate) struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    pub(crate) fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            held: String::new(),
        }
    }

    /// Adds `text`; returns what may be emitted now, and whether a stop sequence was hit
    /// (then the returned text is everything before it and generation must end).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop sequence.
        let mut keep = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if self.held.ends_with(&stop[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Whatever is still held back (the generation ended without a stop sequence).
    pub(crate) fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_filter_holds_back_prefixes_and_cuts_at_the_stop() {
        let stops = vec!["\nUser:".to_string(), "END".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("Hello"), ("Hello".to_string(), false));
        assert_eq!(f.push(" wor\nUs"), (" wor".to_string(), false));
        assert_eq!(f.push("er: hi"), (String::new(), true));
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("EN"), (String::new(), false));
        assert_eq!(f.push("x"), ("ENx".to_string(), false));
        assert_eq!(f.push("abcEND tail"), ("abc".to_string(), true));
    }

    #[test]
    fn stop_filter_without_stops_passes_everything() {
        let mut f = StopFilter::new(&[]);
        assert_eq!(f.push("a"), ("a".to_string(), false));
        assert_eq!(f.finish(), "");
    }
}
