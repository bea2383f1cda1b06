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

    /// Adds `text`; returns what may be emitted now, and the stop sequence that was hit, if
    /// one was (its index in the list; then the returned text is everything before it and
    /// generation must end). Of two stop sequences in the text, the one that starts first
    /// wins, and of two starting at the same place the one listed first.
    pub(crate) fn push(&mut self, text: &str) -> (String, Option<u32>) {
        self.held.push_str(text);
        let hit = self
            .stops
            .iter()
            .zip(0u32..)
            .filter(|(s, _)| !s.is_empty())
            .filter_map(|(s, i)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, index)) = hit {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, Some(index));
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
        (out, None)
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
        assert_eq!(f.push("Hello"), ("Hello".to_string(), None));
        assert_eq!(f.push(" wor\nUs"), (" wor".to_string(), None));
        assert_eq!(f.push("er: hi"), (String::new(), Some(0)));
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("EN"), (String::new(), None));
        assert_eq!(f.push("x"), ("ENx".to_string(), None));
        assert_eq!(f.push("abcEND tail"), ("abc".to_string(), Some(1)));
        // The stop that starts first wins, whatever its place in the list.
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("aEND\nUser:"), ("a".to_string(), Some(1)));
    }

    #[test]
    fn stop_filter_without_stops_passes_everything() {
        let mut f = StopFilter::new(&[]);
        assert_eq!(f.push("a"), ("a".to_string(), None));
        assert_eq!(f.finish(), "");
    }
}
