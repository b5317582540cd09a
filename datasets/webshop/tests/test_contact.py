def test_contact_form_delivers_the_message(page, base, shop):
    page.goto(base + "/contact")
    page.fill("input[name=email]", "carol@example.org")
    page.fill("textarea[name=message]", "Is the teapot dishwasher-safe?")
    page.click("#send")
    assert page.text_content("#thanks").startswith("Thank you")
    assert shop.messages[-1] == {"email": "carol@example.org", "message": "Is the teapot dishwasher-safe?"}


def test_unknown_page_is_not_found(page, base):
    response = page.goto(base + "/no-such-page")
    assert response.status == 404
