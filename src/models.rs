//! Model names as a token's `models` list or a route's `models` names them: a name matches
//! itself, and a name ending in `*` matches every model it begins.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRule {
    Exact(String),
    Prefix(String),
}

impl ModelRule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rule = match text.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(text.to_owned()),
        };
        match &rule {
            Self::Exact(s) | Self::Prefix(s) if s.contains('*') => Err(format!(
                "{text:?}: `*` may only end a model name, to match a prefix"
            )),
            Self::Exact(s) if s.is_empty() => Err("an empty model name".into()),
            _ => Ok(rule),
        }
    }

    pub fn matches(&self, model: &str) -> bool {
        match self {
            Self::Exact(name) => model == name,
            Self::Prefix(prefix) => model.starts_with(prefix.as_str()),
        }
    }
}
