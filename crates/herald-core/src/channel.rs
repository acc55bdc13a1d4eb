//! Channel names: namespace (before the first ':'), private ('$' prefix), user-limited
//! ('#' followed by a comma-separated list of users).

/// The namespace part of a channel name; "" when there is none.
pub fn namespace(channel: &str) -> &str {
    let name = channel.strip_prefix('$').unwrap_or(channel);
    match name.find(':') {
        Some(i) => &name[..i],
        None => "",
    }
}

/// Private channels need a subscription token.
pub fn is_private(channel: &str) -> bool {
    channel.starts_with('$')
}

/// For a user-limited channel (`dialog#42,43`, `personal:#42`), the users allowed in it.
pub fn allowed_users(channel: &str) -> Option<impl Iterator<Item = &str>> {
    let i = channel.rfind('#')?;
    Some(channel[i + 1..].split(',').filter(|u| !u.is_empty()))
}

/// Whether `user` may subscribe to the user-limited channel; None if the channel is not
/// user-limited.
pub fn user_allowed(channel: &str, user: &str) -> Option<bool> {
    allowed_users(channel).map(|mut users| !user.is_empty() && users.any(|u| u == user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        assert_eq!(namespace("chat:room"), "chat");
        assert_eq!(namespace("room"), "");
        assert_eq!(namespace("$chat:x"), "chat");
        assert_eq!(namespace("a:b:c"), "a");
    }

    #[test]
    fn user_limited() {
        assert_eq!(user_allowed("dialog#42,43", "42"), Some(true));
        assert_eq!(user_allowed("dialog#42,43", "44"), Some(false));
        assert_eq!(user_allowed("personal:#42", "42"), Some(true));
        assert_eq!(user_allowed("personal:#42", ""), Some(false));
        assert_eq!(user_allowed("news", "42"), None);
    }
}
