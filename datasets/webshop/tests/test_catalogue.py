import pytest

# the catalogue comes from the API host: granted to these tests under a strict tier
pytestmark = pytest.mark.sandhop(allow=["browser.request api.shop.test:*"])


def test_home_lists_products(page, base):
    page.goto(base + "/")
    page.wait_for_selector("#products li >> nth=4")
    assert page.locator("#products li").count() == 5


def test_search_filters_by_name_and_tag(page, base):
    page.goto(base + "/")
    page.wait_for_selector("#products li >> nth=4")  # the first rendering is done
    assert page.evaluate("shop.render('kitchen')") == 2
    assert page.evaluate("shop.render('pen')") == 1
    assert page.evaluate("shop.render('nothing-like-this')") == 0


def test_cart_counts_added_items(page, base):
    page.goto(base + "/cart")
    page.evaluate("shop.add(1)")
    cart = page.evaluate("shop.add(3)")
    assert cart["items"] == [1, 3]
    assert page.text_content("#count") == "2"
