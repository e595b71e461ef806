from django.urls import include, path

from testproject import views

urlpatterns = [
    path("badge/<int:user_id>/", views.badge_page, name="badge-page"),
    path("countersink/", include("countersink.urls")),
]
