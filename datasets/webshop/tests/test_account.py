def log_in(page, base, user="alice", password="wonderland"):
    page.goto(base + "/login")
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("#submit")


def test_login_reaches_the_account(page, base):
    log_in(page, base)
    assert page.url.endswith("/account")
    assert page.text_content("#welcome") == "Welcome alice"
    assert len(page.evaluate("localStorage.getItem('token')")) == 32


def test_wrong_password_is_refused(page, base):
    log_in(page, base, password="guess")
    assert page.text_content("#error") == "wrong user or password"


def test_account_needs_a_login(page, base):
    page.goto(base + "/account")
    assert page.url.endswith("/login")


def test_session_cookie_is_http_only(page, base):
    log_in(page, base, user="bob", password="builder")
    assert page.evaluate("document.cookie") == ""
    assert any(c["name"] == "session" and c["httpOnly"] for c in page.context.cookies())
