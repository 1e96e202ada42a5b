//! Owns the filter configuration document as the xDS server sends it: shared pieces whose
//! concatenation is the JSON text. The live renderer's pieces are its runs' joined texts
//! (module `runs`), so a change copies the 4 MB document at 20,000 connectors once, into the
//! ECDS resource, instead of joining it into a string first and copying that.

use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct Document {
    pieces: Vec<Arc<str>>,
    len: usize,
}

impl Document {
    pub fn from_text(text: impl Into<Arc<str>>) -> Self {
        Self::from_pieces(vec![text.into()])
    }

    pub fn from_pieces(pieces: Vec<Arc<str>>) -> Self {
        let len = pieces.iter().map(|p| p.len()).sum();
        Self { pieces, len }
    }

    /// The text's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order: the text is their concatenation.
    pub fn pieces(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().map(|p| &**p)
    }

    /// The whole text, copied into one string (tests, the WasmPlugin writer).
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.len);
        self.pieces().for_each(|p| out.push_str(p));
        out
    }
}

/// Equal texts, however they are cut. (Istio mode compares its documents, each one piece, per
/// change; the live renderer's are compared by address.)
impl PartialEq for Document {
    fn eq(&self, other: &Self) -> bool {
        if let ([a], [b]) = (&self.pieces[..], &other.pieces[..]) {
            return a == b;
        }
        let bytes = |d: &Self| d.pieces.iter().flat_map(|p| p.bytes()).collect::<Vec<u8>>();
        self.len == other.len && bytes(self) == bytes(other)
    }
}

impl Eq for Document {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_is_its_pieces_concatenated_and_equal_however_cut() {
        let cut = Document::from_pieces(vec!["{\"a\":[".into(), "1".into(), ",".into(), "2]}".into()]);
        let whole = Document::from_text("{\"a\":[1,2]}");
        assert_eq!(cut.text(), "{\"a\":[1,2]}");
        assert_eq!(cut.len(), whole.len());
        assert_eq!(cut, whole);
        assert_ne!(cut, Document::from_text("{\"a\":[1,3]}"));
        assert_eq!(whole, Document::from_text("{\"a\":[1,2]}"));
        assert_ne!(whole, Document::from_text("{\"a\":[1,3]}"));
    }
}
